//! The XDP filter at the interface (`[xdp]`), managed like the sockets: pinned,
//! adopted by a restarted supervisor, replaced atomically, and switched between
//! rulesets with one write.
//!
//! Pins, under `<service_pin_dir>/xdp/<ifname>/` (names in
//! `supervisor_common::xdp::pin_names`): the `bpf_link` that attaches the program
//! (`link`), the program, and its maps. The link pin is what keeps the filter
//! attached without a supervisor; removing it (and closing our fd) detaches it.
//!
//! - [`XdpFilter::start`] attaches the program through a new link, or adopts the
//!   link a previous supervisor pinned. An adopted link whose program differs from
//!   this build's is switched to ours with `BPF_LINK_UPDATE`: same link, same
//!   attachment, never a moment without a filter. A program on the interface that
//!   is not behind our pinned link is never touched: start refuses.
//! - [`XdpFilter::apply`] builds a ruleset (listener table, IPv4 and IPv6 prefix
//!   tries) in fresh maps, stores them in the ruleset slot the program does not
//!   use, and switches with one 8-byte store of the mmapped control word. It is
//!   [`XdpFilter::prepare`] (validate and build; nothing changes) followed by
//!   [`XdpFilter::commit`] (the switch), for callers that want them apart.
//!   Before it refills a slot it waits for an RCU grace period
//!   ([`crate::sys::synchronize_rcu`]), so no packet that read the control word
//!   before the previous switch can still be looking at that slot.
//! - Counters (per-CPU, per verdict and reason) and the rate limiter's table sit
//!   outside the slots, so rules changes and restarts keep them.
//!
//! A restarted supervisor reuses the pinned maps only when they have exactly this
//! build's layouts (compared with the definitions in the embedded object, plus a
//! fingerprint stored in the control word); otherwise it creates fresh ones, and the
//! link update moves the filter onto them in the same step as onto the new program.
mod change;
mod config;
mod errors;
mod layout;
mod link;
mod netlink;
pub mod prefix_table;
pub mod rules;
mod rulesets;
mod status;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::links::FdLink;
use supervisor_common::xdp::RulesetControl;

pub use change::XdpChange;
pub use config::{RateLimit, XdpConfig, XdpMode};
pub use link::remove_stale;
pub use netlink::AttachMode;
pub use rulesets::{PreparedRuleset, ReadersGone};
pub use status::{XdpCounters, XdpStatus};

use crate::error::InputError;
use layout::{ObjectLayout, pinned_layout};
use link::program_info;
use rulesets::FilterMaps;

/// The filter on one interface, attached and serving a ruleset.
pub struct XdpFilter {
    config: XdpConfig,
    ifindex: u32,
    mode: AttachMode,
    dir: PathBuf,
    /// Our fd on the pinned link (the pin keeps the attachment; the fd lets us read
    /// its info).
    link: FdLink,
    link_id: u32,
    program_id: u32,
    maps: FilterMaps,
}

impl XdpFilter {
    /// Builds a new ruleset in fresh maps and switches to it with one write.
    /// Validates first; on error nothing changes. The link (and its id) stays.
    /// Blocks the calling thread for an RCU grace period if the slot it refills
    /// needs one; the daemon uses [`Self::prepare`], [`ReadersGone::wait`] and
    /// [`Self::commit`] instead, so its event loop never blocks.
    pub fn apply(&mut self, config: &XdpConfig, listeners: &[SocketAddr]) -> Result<()> {
        let prepared = self.prepare(config, listeners)?;
        let readers = ReadersGone::wait_blocking(self.ruleset_generation());
        self.commit(prepared, readers)
    }

    /// The first half of [`Self::apply`]: validates `config` against the running
    /// filter and builds its ruleset in fresh maps, changing nothing the program
    /// sees. An upgrade can prepare before it builds the new generation (so a bad
    /// rule refuses the upgrade) and [`Self::commit`] at its flip.
    pub fn prepare(&self, config: &XdpConfig, listeners: &[SocketAddr]) -> Result<PreparedRuleset> {
        if config.interface != self.config.interface {
            return Err(InputError::new(format!(
                "[xdp] xdp.interface changed from {:?} to {:?}: moving the filter to another interface needs a supervisor restart",
                self.config.interface, config.interface
            ))
            .into());
        }
        if !config.mode.accepts(self.mode) {
            return Err(InputError::new(format!(
                "[xdp] xdp.mode = \"{}\", but the filter runs in {} mode and a link cannot change mode in place; \
                 changing it needs a restart with the link pin removed (see `supervisor status`)",
                config.mode, self.mode
            ))
            .into());
        }
        let ruleset =
            rules::compile(config, listeners).map_err(|e| InputError::new(format!("[xdp] {e}")))?;
        self.maps.build(&ruleset, config)
    }

    /// The second half of [`Self::apply`]: the one-write switch to a prepared
    /// ruleset. `readers` proves the grace period since the last switch (see the
    /// module docs); get it with [`ReadersGone::wait`] after reading
    /// [`Self::ruleset_generation`], without holding any lock the event loop needs.
    pub fn commit(&mut self, prepared: PreparedRuleset, readers: ReadersGone) -> Result<()> {
        self.maps.switch(&prepared, readers)?;
        self.config = prepared.config;
        Ok(())
    }

    /// The ruleset switched in last (what a [`ReadersGone`] must be waited after).
    pub fn ruleset_generation(&self) -> u32 {
        RulesetControl::from_word(self.maps.control.load(0)).generation
    }

    pub fn status(&self) -> XdpStatus {
        let control = RulesetControl::from_word(self.maps.control.load(0));
        let (link_id, program_id) = self
            .link
            .info()
            .map(|info| (info.id(), info.program_id()))
            .unwrap_or((self.link_id, self.program_id));
        let (run_count, run_time_ns) = program_info(&self.dir, program_id)
            .map(|info| (info.run_count(), info.run_time().as_nanos() as u64))
            .unwrap_or((0, 0));
        XdpStatus {
            interface: self.config.interface.clone(),
            ifindex: self.ifindex,
            link_id,
            program_id,
            mode: self.mode,
            ruleset_generation: control.generation,
            deny: self.config.deny.len(),
            allow: self.config.allow.len(),
            rate_limit: self.config.rate_limit,
            drop_malformed: self.config.drop_malformed,
            counters: self.maps.counters(),
            run_count,
            run_time_ns,
        }
    }

    pub fn link_id(&self) -> u32 {
        self.link_id
    }

    /// The program the link runs now.
    pub fn program_id(&self) -> u32 {
        self.link
            .info()
            .map(|info| info.program_id())
            .unwrap_or(self.program_id)
    }

    pub fn interface(&self) -> &str {
        &self.config.interface
    }

    /// `<service_pin_dir>/xdp/<ifname>`.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// Detaches the filter and removes its pins (for a service that no longer wants
    /// it, or a clean shutdown that should not leave a filter behind).
    pub fn remove(self) -> Result<()> {
        let dir = self.dir.clone();
        let interface = self.config.interface.clone();
        // Our fds go first, so removing the link pin drops the last reference.
        drop(self);
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        tracing::info!("xdp: filter removed from {interface}");
        Ok(())
    }
}

/// Whether the filter pinned at `dir` (`<service_pin_dir>/xdp/<ifname>/`) was set
/// up by a build whose map layouts differ from this one's (its control word says
/// so). A start of this build does not reuse such map pins, whatever they are: it
/// puts fresh maps in place and moves the link onto them with its program update.
/// Reads only, logs nothing.
pub fn pinned_by_another_layout(dir: &Path) -> bool {
    match (pinned_layout(dir), ObjectLayout::parse()) {
        (Some(layout), Ok(object)) => layout != object.fingerprint,
        _ => false,
    }
}
