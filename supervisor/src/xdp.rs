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
mod netlink;
pub mod rules;

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    EbpfLoader,
    maps::{Array, ArrayOfMaps, LpmTrie, Map, MapData, MapInfo, PerCpuArray, lpm_trie::Key},
    programs::{
        ProgramInfo, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, LinkType, PinnedLink},
        loaded_links, loaded_programs,
        xdp::XdpLink,
    },
};
use serde::{Deserialize, Serialize};
use supervisor_common::xdp::{
    LAYOUT_VERSION, ListenerKey, ListenerRule, RULESET_SLOTS, RulesetControl, XdpCounter, counter,
    map_names, pin_names, program_names,
};

pub use netlink::AttachMode;

use crate::{ebpf::XDP_OBJECT, error::InputError, sys::ControlWord};

/// `[xdp]` in the service's config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    /// The interface the filter attaches to, e.g. "eth0".
    pub interface: String,
    #[serde(default)]
    pub mode: XdpMode,
    /// Source prefixes whose datagrams to the service are dropped.
    #[serde(default)]
    pub deny: Vec<String>,
    /// If not empty: only these sources may reach the service (deny still wins).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Per source address, over all the service's listeners.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default = "default_true")]
    pub drop_malformed: bool,
}

fn default_true() -> bool {
    true
}

/// Where the program runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver; an error if the driver cannot.
    Native,
    /// In the generic stack (after the skb is built: slower, works everywhere).
    Generic,
    /// Native if the driver can, else generic.
    #[default]
    Auto,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Auto => "auto",
        })
    }
}

impl XdpMode {
    fn accepts(self, attached: AttachMode) -> bool {
        match self {
            XdpMode::Native => attached == AttachMode::Native,
            XdpMode::Generic => attached == AttachMode::Generic,
            XdpMode::Auto => attached != AttachMode::Offload,
        }
    }
}

/// `rate_limit = { packets_per_second = 1000, burst = 2000 }`: per source address,
/// a sustained rate and how many datagrams may arrive at once (default: one
/// second's worth).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub packets_per_second: u64,
    #[serde(default)]
    pub burst: Option<u64>,
}

impl RateLimit {
    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or(self.packets_per_second)
    }
}

impl XdpConfig {
    /// Checks everything `start` and `apply` would refuse for bad input: prefixes,
    /// rate limit, and that the interface exists. Messages name the file, the key
    /// and the value.
    pub fn validate(&self, file: &Path) -> Result<(), InputError> {
        rules::compile(self, &[])
            .map_err(|e| InputError::new(format!("{}: {e}", file.display())))?;
        interface_index(&self.interface)
            .map(|_| ())
            .map_err(|e| InputError::new(format!("{}: xdp.interface: {e}", file.display())))
    }
}

/// The interface's index in the calling thread's network namespace.
fn interface_index(name: &str) -> Result<u32, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    nix::net::if_::if_nametoindex(name).map_err(|_| {
        format!("no interface {name:?} on this host (in the supervisor's network namespace)")
    })
}

/// Counters per verdict and reason, summed over CPUs (packets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpCounters {
    /// The service's datagrams that passed every rule.
    pub passed: u64,
    pub denied: u64,
    pub not_allowed: u64,
    pub rate_limited: u64,
    pub malformed: u64,
    /// Everything else, passed untouched.
    pub not_ours: u64,
    /// Non-first UDP fragments, passed untouched (their first fragment was judged).
    pub fragments: u64,
    /// Bytes of all dropped packets.
    pub dropped_bytes: u64,
}

impl XdpCounters {
    pub fn dropped(&self) -> u64 {
        self.denied + self.not_allowed + self.rate_limited + self.malformed
    }
}

/// What `supervisor status` shows for the filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XdpStatus {
    pub interface: String,
    pub ifindex: u32,
    pub link_id: u32,
    pub program_id: u32,
    pub mode: AttachMode,
    pub ruleset_generation: u32,
    pub deny: usize,
    pub allow: usize,
    pub rate_limit: Option<RateLimit>,
    pub drop_malformed: bool,
    pub counters: XdpCounters,
    /// The program's runs and total run time: non-zero only while
    /// `kernel.bpf_stats_enabled = 1`. Their ratio is the per-packet cost.
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl XdpStatus {
    /// Human-readable lines for `supervisor status`.
    pub fn render(&self) -> String {
        let c = &self.counters;
        let mut out = format!(
            "xdp: {} (ifindex {}), {} mode, link {}, program {}, ruleset {}\n  rules: {} deny, {} allow{}{}\n  passed {}, dropped {} (denied {}, not allowed {}, rate limited {}, malformed {}), not ours {}, fragments {}\n",
            self.interface,
            self.ifindex,
            self.mode,
            self.link_id,
            self.program_id,
            self.ruleset_generation,
            self.deny,
            self.allow,
            match &self.rate_limit {
                Some(r) => format!(
                    ", rate limit {}/s burst {}",
                    r.packets_per_second,
                    r.burst()
                ),
                None => String::new(),
            },
            if self.drop_malformed {
                ", malformed dropped"
            } else {
                ""
            },
            c.passed,
            c.dropped(),
            c.denied,
            c.not_allowed,
            c.rate_limited,
            c.malformed,
            c.not_ours,
            c.fragments,
        );
        if self.run_count > 0 {
            out.push_str(&format!(
                "  cost: {:.1} ns per packet over {} runs\n",
                self.run_time_ns as f64 / self.run_count as f64,
                self.run_count
            ));
        }
        out
    }
}

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

/// The filter's maps, open: what installing a ruleset and reading counters need.
struct FilterMaps {
    layout: u16,
    control: ControlWord,
    listeners: ArrayOfMaps<MapData, MapData>,
    prefixes_v4: ArrayOfMaps<MapData, MapData>,
    prefixes_v6: ArrayOfMaps<MapData, MapData>,
    counters: PerCpuArray<MapData, XdpCounter>,
    /// The inner map definitions from the object, for building rulesets that the
    /// outer maps accept.
    inner: InnerDefinitions,
    /// The rate table; pinned, kept open only so the filter owns all its maps.
    _rate: Map,
}

#[derive(Clone)]
struct InnerDefinitions {
    listeners: aya_obj::Map,
    prefixes_v4: aya_obj::Map,
    prefixes_v6: aya_obj::Map,
}

/// A ruleset built in fresh maps by [`XdpFilter::prepare`], not yet in use.
/// Dropping it discards the maps.
pub struct PreparedRuleset {
    config: XdpConfig,
    listeners: MapData,
    prefixes_v4: MapData,
    prefixes_v6: MapData,
    /// IPv4 prefixes, IPv6 prefixes, listener entries: for the log.
    sizes: (usize, usize, usize),
}

/// A link of ours found pinned and attached to the interface.
struct Adopted {
    link: FdLink,
    link_id: u32,
    program_id: u32,
    mode: AttachMode,
}

impl XdpFilter {
    /// Attach (or adopt the link pinned at `<service_pin_dir>/xdp/<ifname>/` by a
    /// previous supervisor, replacing its program with a link update if this build's
    /// differs, keeping the link id), then apply the rules.
    ///
    /// Refuses with an [`InputError`] (nothing attached, nothing changed) for bad
    /// rules, an unknown interface, a mode the driver cannot do, or an XDP program
    /// on the interface that is not behind our pinned link.
    pub fn start(
        config: &XdpConfig,
        service_pin_dir: &Path,
        listeners: &[SocketAddr],
    ) -> Result<XdpFilter> {
        let ruleset =
            rules::compile(config, listeners).map_err(|e| InputError::new(format!("[xdp] {e}")))?;
        let ifindex = interface_index(&config.interface)
            .map_err(|e| InputError::new(format!("[xdp] xdp.interface: {e}")))?;
        let xdp_dir = service_pin_dir.join(pin_names::XDP_DIR);
        let dir = xdp_dir.join(&config.interface);
        let attached = netlink::xdp_state(ifindex).with_context(|| {
            format!(
                "asking the kernel which XDP programs {} runs",
                config.interface
            )
        })?;

        let adopted = adopt_link(&dir, &config.interface, &attached)?;
        match &adopted {
            Some(adopted) if !config.mode.accepts(adopted.mode) => {
                return Err(InputError::new(format!(
                    "[xdp] mode = \"{}\", but the filter's link on {} (pinned at {}) runs in {} mode, and a link cannot change mode in place. \
                     To switch, remove that pin (the interface is unfiltered until the next start) and start again, or set mode = \"auto\"",
                    config.mode,
                    config.interface,
                    dir.join(pin_names::LINK).display(),
                    adopted.mode
                ))
                .into());
            }
            Some(_) => {}
            None => {
                if let Some((id, mode)) = attached.programs().next() {
                    return Err(InputError::new(format!(
                        "[xdp] {} already runs XDP program id {id} in {mode} mode, which this supervisor does not own \
                         (no link of ours is pinned at {}); it is left alone. Detach it first \
                         (`ip link set dev {} xdp off` if it was attached through netlink, or stop what holds its link), \
                         or filter on another interface",
                        config.interface,
                        dir.join(pin_names::LINK).display(),
                        config.interface
                    ))
                    .into());
                }
            }
        }

        // Only now, with nothing left to refuse, is anything created.
        crate::bpffs::ensure(&dir)?;
        let object = ObjectLayout::parse()?;
        let fresh = adopted.is_none();
        if fresh || !pins_reusable(&dir, &object) {
            // Pins without a live link, or from a build with other layouts: start
            // from fresh maps (the link, if any, is kept: the update below moves it
            // onto the new program and maps at once).
            remove_map_pins(&dir)?;
        }
        let result = Self::start_in(config, ifindex, &dir, &object, adopted, &ruleset);
        match result {
            Ok(filter) => {
                remove_other_interfaces(&xdp_dir, &config.interface);
                Ok(filter)
            }
            Err(e) => {
                if fresh {
                    // Nothing was attached before: leave nothing behind. Removing the
                    // link pin detaches it once our fd (dropped with the error) closes.
                    let _ = std::fs::remove_dir_all(&dir);
                    let _ = std::fs::remove_dir(&xdp_dir);
                }
                Err(e)
            }
        }
    }

    fn start_in(
        config: &XdpConfig,
        ifindex: u32,
        dir: &Path,
        object: &ObjectLayout,
        adopted: Option<Adopted>,
        ruleset: &rules::Ruleset,
    ) -> Result<XdpFilter> {
        let mut loader = EbpfLoader::new();
        for (name, pin) in map_names::ALL {
            // Opens the pin if it exists, else creates the map and pins it.
            loader.map_pin_path(name, dir.join(pin));
        }
        let mut ebpf = loader.load(XDP_OBJECT).map_err(|e| {
            if is_os_error(&e, &[libc::EPERM, libc::EACCES]) {
                anyhow::Error::new(InputError::new(format!(
                    "missing privileges for bpf(): loading the XDP filter failed ({e}); run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
                )))
            } else {
                anyhow::Error::new(e).context("loading the XDP filter's eBPF object")
            }
        })?;
        let program: &mut Xdp = ebpf
            .program_mut(program_names::FILTER)
            .context("the eBPF object has no XDP filter program")?
            .try_into()?;
        program
            .load()
            .context("the kernel refused the XDP filter program")?;

        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        };
        let control_map = take(map_names::CONTROL)?;
        let listeners = ArrayOfMaps::try_from(take(map_names::LISTENERS)?)?;
        let prefixes_v4 = ArrayOfMaps::try_from(take(map_names::PREFIXES_V4)?)?;
        let prefixes_v6 = ArrayOfMaps::try_from(take(map_names::PREFIXES_V6)?)?;
        let counters = PerCpuArray::try_from(take(map_names::COUNTERS)?)?;
        let rate = take(map_names::RATE)?;
        let Map::Array(control_data) = &control_map else {
            anyhow::bail!(
                "the XDP filter's {} map is not an array",
                map_names::CONTROL
            );
        };
        let control = ControlWord::map(control_data.fd().as_fd(), 1)
            .context("mapping the XDP filter's control word")?;

        let mut maps = FilterMaps {
            layout: object.fingerprint,
            control,
            listeners,
            prefixes_v4,
            prefixes_v6,
            counters,
            inner: object.inner.clone(),
            _rate: rate,
        };
        // The rules go in before the program runs on them: a fresh link filters
        // from its first packet; an adopted link's program shares these maps
        // (same layout) or is moved onto them by the update below.
        let prepared = maps.build(ruleset, config)?;
        maps.switch(&prepared)?;

        let program: &mut Xdp = ebpf
            .program_mut(program_names::FILTER)
            .context("the eBPF object has no XDP filter program")?
            .try_into()?;
        let ours = program
            .info()
            .context("reading the XDP filter program's info")?;
        let (link, link_id, program_id, mode) = match adopted {
            Some(adopted) if same_program(dir, adopted.program_id, &ours) => {
                tracing::info!(
                    "xdp: adopted link {} on {} (program {} unchanged)",
                    adopted.link_id,
                    config.interface,
                    adopted.program_id
                );
                (
                    adopted.link,
                    adopted.link_id,
                    adopted.program_id,
                    adopted.mode,
                )
            }
            Some(adopted) => {
                // BPF_LINK_UPDATE: the kernel swaps the program under the same link
                // in one step; packets see the old program or the new one.
                let link = XdpLink::try_from(adopted.link)
                    .context("the pinned link is not an XDP link")?;
                let id = program
                    .attach_to_link(link)
                    .context("replacing the XDP program through its link (BPF_LINK_UPDATE)")?;
                let link = FdLink::try_from(program.take_link(id)?)?;
                let _ = std::fs::remove_file(dir.join(pin_names::PROGRAM));
                program
                    .pin(dir.join(pin_names::PROGRAM))
                    .context("pinning the XDP filter program")?;
                tracing::info!(
                    "xdp: link {} on {}: program {} replaced by {} (link update)",
                    adopted.link_id,
                    config.interface,
                    adopted.program_id,
                    ours.id()
                );
                (link, adopted.link_id, ours.id(), adopted.mode)
            }
            None => {
                let (link, mode) = attach(program, ifindex, config)?;
                let pin = dir.join(pin_names::LINK);
                let link = FdLink::from(
                    link.pin(&pin)
                        .with_context(|| format!("pinning the XDP link at {}", pin.display()))?,
                );
                let link_id = link.info().context("reading the XDP link's info")?.id();
                program
                    .pin(dir.join(pin_names::PROGRAM))
                    .context("pinning the XDP filter program")?;
                tracing::info!(
                    "xdp: attached to {} in {mode} mode (link {link_id}, program {})",
                    config.interface,
                    ours.id()
                );
                (link, link_id, ours.id(), mode)
            }
        };
        // The program now runs through the link (or an identical one does); the
        // loader's own handles can go.
        drop(ebpf);
        Ok(XdpFilter {
            config: config.clone(),
            ifindex,
            mode,
            dir: dir.to_path_buf(),
            link,
            link_id,
            program_id,
            maps,
        })
    }

    /// Builds a new ruleset in fresh maps and switches to it with one write.
    /// Validates first; on error nothing changes. The link (and its id) stays.
    pub fn apply(&mut self, config: &XdpConfig, listeners: &[SocketAddr]) -> Result<()> {
        let prepared = self.prepare(config, listeners)?;
        self.commit(prepared)
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
    /// ruleset (after an RCU grace period, see the module docs).
    pub fn commit(&mut self, prepared: PreparedRuleset) -> Result<()> {
        self.maps.switch(&prepared)?;
        self.config = prepared.config;
        Ok(())
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

impl FilterMaps {
    /// Builds a ruleset in fresh maps. Changes nothing the program sees.
    fn build(&self, ruleset: &rules::Ruleset, config: &XdpConfig) -> Result<PreparedRuleset> {
        // Only names the maps (for bpftool): the generation is fixed at the switch.
        let next = RulesetControl::from_word(self.control.load(0))
            .generation
            .wrapping_add(1);
        Ok(PreparedRuleset {
            config: config.clone(),
            listeners: build_listeners(&self.inner.listeners, next, &ruleset.listeners)?,
            prefixes_v4: build_trie::<4>(&self.inner.prefixes_v4, "v4", next, &ruleset.v4)?,
            prefixes_v6: build_trie::<16>(&self.inner.prefixes_v6, "v6", next, &ruleset.v6)?,
            sizes: (ruleset.v4.len(), ruleset.v6.len(), ruleset.listeners.len()),
        })
    }

    /// Stores a built ruleset in the slot the program does not use, then switches
    /// to it with one store of the control word. Returns the new generation.
    fn switch(&mut self, prepared: &PreparedRuleset) -> Result<u32> {
        let current = RulesetControl::from_word(self.control.load(0));
        let slot = if current.armed != 0 {
            (u32::from(current.slot) + 1) % RULESET_SLOTS
        } else {
            0
        };
        let generation = current.generation.wrapping_add(1).max(1);
        if current.armed != 0 {
            // Packets that read the word before the previous switch may still be
            // reading this slot; after a grace period none can be.
            wait_for_readers();
        }
        self.listeners
            .set(slot, &prepared.listeners, 0)
            .context("storing the listener table in its ruleset slot")?;
        self.prefixes_v4
            .set(slot, &prepared.prefixes_v4, 0)
            .context("storing the IPv4 prefixes in their ruleset slot")?;
        self.prefixes_v6
            .set(slot, &prepared.prefixes_v6, 0)
            .context("storing the IPv6 prefixes in their ruleset slot")?;
        // The switch: from the next packet on, the program reads the new slot.
        self.control.store(
            0,
            RulesetControl {
                slot: slot as u8,
                armed: 1,
                layout: self.layout,
                generation,
            }
            .to_word(),
        );
        let (v4, v6, listeners) = prepared.sizes;
        tracing::info!(
            "xdp: ruleset {generation} active on {} ({v4} IPv4 and {v6} IPv6 prefixes, {listeners} listener entries)",
            prepared.config.interface,
        );
        Ok(generation)
    }

    fn counters(&self) -> XdpCounters {
        let read = |index: u32| -> XdpCounter {
            match self.counters.get(&index, 0) {
                Ok(values) => values
                    .iter()
                    .fold(XdpCounter::default(), |sum, c| XdpCounter {
                        packets: sum.packets + c.packets,
                        bytes: sum.bytes + c.bytes,
                    }),
                Err(e) => {
                    tracing::warn!("xdp: reading counter {index}: {e}");
                    XdpCounter::default()
                }
            }
        };
        let all: Vec<XdpCounter> = (0..counter::COUNT).map(read).collect();
        let dropped = [
            counter::DENIED,
            counter::NOT_ALLOWED,
            counter::RATE_LIMITED,
            counter::MALFORMED,
        ];
        XdpCounters {
            passed: all[counter::PASSED as usize].packets,
            denied: all[counter::DENIED as usize].packets,
            not_allowed: all[counter::NOT_ALLOWED as usize].packets,
            rate_limited: all[counter::RATE_LIMITED as usize].packets,
            malformed: all[counter::MALFORMED as usize].packets,
            not_ours: all[counter::NOT_OURS as usize].packets,
            fragments: all[counter::FRAGMENT as usize].packets,
            dropped_bytes: dropped.iter().map(|&i| all[i as usize].bytes).sum(),
        }
    }
}

/// Removes our pinned links (and thereby detaches them) for a service whose config
/// no longer has `[xdp]`. Call it with no [`XdpFilter`] of that service alive.
pub fn remove_stale(service_pin_dir: &Path) -> Result<()> {
    let dir = service_pin_dir.join(pin_names::XDP_DIR);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            tracing::info!(
                "xdp: removed the filter pinned at {} (no [xdp] in the config)",
                dir.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// The pinned link, if it is ours and attached to this interface.
fn adopt_link(
    dir: &Path,
    interface: &str,
    attached: &netlink::XdpState,
) -> Result<Option<Adopted>> {
    let path = dir.join(pin_names::LINK);
    if !path.exists() {
        return Ok(None);
    }
    let stale = |why: String| -> Result<Option<Adopted>> {
        tracing::warn!("xdp: {}: {why}; attaching afresh", path.display());
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale pin {}", path.display()))?;
        Ok(None)
    };
    let link = match PinnedLink::from_pin(&path) {
        Ok(link) => FdLink::from(link),
        Err(e) => return stale(format!("not a usable link ({e})")),
    };
    let info = link.info().context("reading the pinned XDP link's info")?;
    if !matches!(info.link_type(), Ok(LinkType::Xdp)) {
        return stale("not an XDP link".into());
    }
    match attached.mode_of(info.program_id()) {
        Some(mode) => Ok(Some(Adopted {
            link_id: info.id(),
            program_id: info.program_id(),
            mode,
            link,
        })),
        // The interface was deleted (which detaches its links) or recreated.
        None => stale(format!(
            "link {} is no longer attached to {interface}",
            info.id()
        )),
    }
}

/// Attaches through a new bpf_link in the configured mode.
fn attach(program: &mut Xdp, ifindex: u32, config: &XdpConfig) -> Result<(FdLink, AttachMode)> {
    let interface = &config.interface;
    let attempt = |program: &mut Xdp, mode: AttachMode| -> Result<FdLink> {
        let flags = match mode {
            AttachMode::Native => AyaXdpMode::Driver,
            _ => AyaXdpMode::Skb,
        };
        let id = program.attach_to_if_index(ifindex, flags).map_err(|e| {
            let errno = os_error(&e);
            let message = match errno {
                Some(libc::EBUSY) | Some(libc::EEXIST) => format!(
                    "[xdp] {interface} got another XDP program meanwhile, which this supervisor does not own; it is left alone"
                ),
                Some(libc::EOPNOTSUPP) if mode == AttachMode::Native => format!(
                    "[xdp] the driver of {interface} cannot run XDP in native mode (mode = \"native\"); use mode = \"generic\" or \"auto\""
                ),
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    format!("[xdp] missing privileges to attach to {interface} ({e}): needs CAP_NET_ADMIN and CAP_BPF")
                }
                _ => format!("[xdp] attaching to {interface} in {mode} mode failed: {}", chain(&e)),
            };
            anyhow::Error::new(InputError::new(message))
        })?;
        // aya falls back to a netlink attachment when the kernel refuses the link
        // with EINVAL; that could be neither pinned nor updated. Detach it and say so.
        let program_id = program.info()?.id();
        let is_link = loaded_links()
            .filter_map(|l| l.ok())
            .any(|l| l.program_id() == program_id && matches!(l.link_type(), Ok(LinkType::Xdp)));
        if !is_link {
            let _ = program.detach(id);
            anyhow::bail!(InputError::new(format!(
                "[xdp] the kernel refused a bpf_link on {interface} in {mode} mode (a netlink attachment, which cannot be pinned, worked instead); the filter needs bpf_link support (Linux 5.9+)"
            )));
        }
        Ok(FdLink::try_from(program.take_link(id)?)?)
    };
    match config.mode {
        XdpMode::Native => Ok((attempt(program, AttachMode::Native)?, AttachMode::Native)),
        XdpMode::Generic => Ok((attempt(program, AttachMode::Generic)?, AttachMode::Generic)),
        XdpMode::Auto => match attempt(program, AttachMode::Native) {
            Ok(link) => Ok((link, AttachMode::Native)),
            Err(native) => {
                tracing::info!(
                    "xdp: native mode on {interface} failed ({native:#}); trying generic"
                );
                match attempt(program, AttachMode::Generic) {
                    Ok(link) => Ok((link, AttachMode::Generic)),
                    Err(generic) => {
                        Err(generic.context(format!("native mode failed too: {native:#}")))
                    }
                }
            }
        },
    }
}

/// Whether the program `running_id` that the link runs is this build's program:
/// same instructions (the kernel's tag hashes them with map references masked) and
/// the same maps, and it is the one pinned as `program`.
fn same_program(dir: &Path, running_id: u32, ours: &ProgramInfo) -> bool {
    let Some(running) = program_info(dir, running_id) else {
        return false;
    };
    let ids = |info: &ProgramInfo| {
        info.map_ids().ok().flatten().map(|mut ids| {
            ids.sort_unstable();
            ids
        })
    };
    running.tag() == ours.tag() && ids(&running).is_some() && ids(&running) == ids(ours)
}

/// The pinned program's info, if it is `program_id`.
fn program_info(dir: &Path, program_id: u32) -> Option<ProgramInfo> {
    match ProgramInfo::from_pin(dir.join(pin_names::PROGRAM)) {
        Ok(info) if info.id() == program_id => Some(info),
        // Pinned program missing or another one: look it up among all programs.
        _ => loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p| p.id() == program_id),
    }
}

/// The map definitions of the embedded object.
struct ObjectLayout {
    maps: HashMap<String, aya_obj::Map>,
    inner: InnerDefinitions,
    /// Hash of every map definition and `LAYOUT_VERSION`, never 0.
    fingerprint: u16,
}

impl ObjectLayout {
    fn parse() -> Result<ObjectLayout> {
        let object =
            aya_obj::Object::parse(XDP_OBJECT).context("parsing the embedded XDP object")?;
        // The same parameters without the object's BTF type ids: rulesets are
        // created without the object's BTF, and the kernel compares outer and inner
        // maps by type, sizes and flags only.
        let inner = |name: &str| -> Result<aya_obj::Map> {
            let def = object
                .maps
                .get(name)
                .and_then(|m| m.inner())
                .with_context(|| format!("the XDP object's {name} has no inner map definition"))?;
            Ok(aya_obj::Map::new_from_params(
                def.map_type(),
                def.key_size(),
                def.value_size(),
                def.max_entries(),
                def.map_flags(),
            ))
        };
        let inner = InnerDefinitions {
            listeners: inner(map_names::LISTENERS)?,
            prefixes_v4: inner(map_names::PREFIXES_V4)?,
            prefixes_v6: inner(map_names::PREFIXES_V6)?,
        };
        // FNV-1a: stable across builds and Rust versions (unlike std's hasher).
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        feed(&[LAYOUT_VERSION]);
        let mut names: Vec<&String> = object.maps.keys().collect();
        names.sort();
        for name in names {
            let map = &object.maps[name];
            feed(name.as_bytes());
            for m in std::iter::once(map.clone()).chain(map.inner()) {
                for v in [
                    m.map_type(),
                    m.key_size(),
                    m.value_size(),
                    m.max_entries(),
                    m.map_flags(),
                ] {
                    feed(&v.to_le_bytes());
                }
            }
        }
        let folded = (hash ^ (hash >> 16) ^ (hash >> 32) ^ (hash >> 48)) as u16;
        Ok(ObjectLayout {
            maps: object.maps,
            inner,
            fingerprint: folded.max(1),
        })
    }
}

/// Whether every pinned map has exactly the definition this build expects and the
/// control word was written by a build with the same layout fingerprint.
fn pins_reusable(dir: &Path, object: &ObjectLayout) -> bool {
    for (name, pin) in map_names::ALL {
        let Some(expected) = object.maps.get(name) else {
            return false;
        };
        let Ok(info) = MapInfo::from_pin(dir.join(pin)) else {
            return false;
        };
        let same = info
            .map_type()
            .is_ok_and(|t| t as u32 == expected.map_type())
            && info.key_size() == expected.key_size()
            && info.value_size() == expected.value_size()
            && info.max_entries() == expected.max_entries()
            && info.map_flags() == expected.map_flags();
        if !same {
            tracing::info!(
                "xdp: pinned map {pin} has another layout than this build's; using fresh maps"
            );
            return false;
        }
    }
    let word = MapData::from_pin(dir.join(pin_names::CONTROL))
        .map_err(anyhow::Error::from)
        .and_then(|data| Ok(Array::<MapData, u64>::try_from(Map::Array(data))?.get(&0, 0)?));
    match word {
        Ok(word) if RulesetControl::from_word(word).layout == object.fingerprint => true,
        _ => {
            tracing::info!(
                "xdp: pinned maps were written by a build with another layout; using fresh maps"
            );
            false
        }
    }
}

/// Removes the map and program pins in `dir`, keeping the link pin.
fn remove_map_pins(dir: &Path) -> Result<()> {
    for pin in map_names::ALL
        .iter()
        .map(|(_, pin)| *pin)
        .chain([pin_names::PROGRAM])
    {
        let path = dir.join(pin);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

/// Filters of this service on interfaces the config no longer names.
fn remove_other_interfaces(xdp_dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(xdp_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name() != keep {
            tracing::info!(
                "xdp: removing the filter on {} (the config now names {keep})",
                entry.file_name().to_string_lossy()
            );
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!("xdp: cannot remove {}: {e}", entry.path().display());
            }
        }
    }
}

fn build_listeners(
    definition: &aya_obj::Map,
    generation: u32,
    entries: &[(ListenerKey, ListenerRule)],
) -> Result<MapData> {
    // Kernel map names: at most 15 characters of [A-Za-z0-9_.].
    let data = MapData::create(definition.clone(), &format!("lst_g{generation}"), None)
        .context("creating a listener table for the XDP filter")?;
    let mut map = Map::HashMap(data);
    {
        let mut table = aya::maps::HashMap::<_, ListenerKey, ListenerRule>::try_from(&mut map)?;
        for (key, rule) in entries {
            table
                .insert(key, rule, 0)
                .context("filling the XDP listener table")?;
        }
    }
    let Map::HashMap(data) = map else {
        unreachable!("constructed as a HashMap above")
    };
    Ok(data)
}

fn build_trie<const N: usize>(
    definition: &aya_obj::Map,
    family: &str,
    generation: u32,
    entries: &[(u32, [u8; N], u32)],
) -> Result<MapData> {
    let data = MapData::create(definition.clone(), &format!("{family}_g{generation}"), None)
        .with_context(|| format!("creating an {family} prefix trie for the XDP filter"))?;
    let mut map = Map::LpmTrie(data);
    {
        let mut trie = LpmTrie::<_, [u8; N], u32>::try_from(&mut map)?;
        for (len, addr, verdict) in entries {
            trie.insert(&Key::new(*len, *addr), verdict, 0)
                .with_context(|| format!("filling the XDP {family} prefix trie"))?;
        }
    }
    let Map::LpmTrie(data) = map else {
        unreachable!("constructed as an LpmTrie above")
    };
    Ok(data)
}

/// Waits until no packet can still be using the slot about to be refilled: every
/// packet that read the control word before the previous switch has finished once
/// an RCU grace period has passed (XDP runs inside an RCU read-side section).
fn wait_for_readers() {
    if let Err(e) = crate::sys::synchronize_rcu() {
        // membarrier(GLOBAL) is refused on nohz_full kernels. A packet's pass
        // through the program takes microseconds; this is thousands of times that.
        tracing::debug!("xdp: membarrier: {e}; waiting instead");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first OS error in an error's chain.
fn os_error(error: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        source = e.source();
    }
    None
}

fn is_os_error(error: &(dyn std::error::Error + 'static), codes: &[i32]) -> bool {
    os_error(error).is_some_and(|code| codes.contains(&code))
}

/// An error and its sources on one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
