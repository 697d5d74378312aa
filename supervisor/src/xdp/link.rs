//! Attaching the filter through a pinned `bpf_link`, adopting the link a previous
//! supervisor pinned, and replacing its program in place.

use std::{net::SocketAddr, os::fd::AsFd, path::Path};

use anyhow::{Context, Result};
use aya::{
    EbpfLoader,
    maps::{Array, ArrayOfMaps, Map, PerCpuArray},
    programs::{
        ProgramInfo, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, LinkType, PinnedLink},
        loaded_links, loaded_programs,
        xdp::XdpLink,
    },
};
use supervisor_common::xdp::{map_names, pin_names, program_names};

use super::{
    AttachMode, XdpConfig, XdpFilter, XdpMode,
    config::interface_index,
    errors::{chain, is_os_error, os_error},
    layout::{ObjectLayout, pins_reusable, remove_map_pins},
    netlink, rules,
    rulesets::{FilterMaps, ReadersGone},
};
use crate::{ebpf::XDP_OBJECT, error::InputError, sys::ControlWord};

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
        let listener_ports = ArrayOfMaps::try_from(take(map_names::LISTENER_PORTS)?)?;
        let rules = Array::try_from(take(map_names::RULES)?)?;
        let listeners = ArrayOfMaps::try_from(take(map_names::LISTENERS)?)?;
        let prefixes_v4 = ArrayOfMaps::try_from(take(map_names::PREFIXES_V4)?)?;
        let prefixes_v4_chunks = ArrayOfMaps::try_from(take(map_names::PREFIXES_V4_CHUNKS)?)?;
        let prefixes_v6 = ArrayOfMaps::try_from(take(map_names::PREFIXES_V6)?)?;
        let prefixes_v6_chunks = ArrayOfMaps::try_from(take(map_names::PREFIXES_V6_CHUNKS)?)?;
        let prefixes_v6_skips = ArrayOfMaps::try_from(take(map_names::PREFIXES_V6_SKIPS)?)?;
        let prefixes_v6_trie = ArrayOfMaps::try_from(take(map_names::PREFIXES_V6_TRIE)?)?;
        let counters = PerCpuArray::try_from(take(map_names::COUNTERS)?)?;
        let mut rate = take(map_names::RATE)?;
        super::rulesets::seed_rate_buckets(&mut rate)?;
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
            listener_ports,
            rules,
            listeners,
            prefixes_v4,
            prefixes_v4_chunks,
            prefixes_v6,
            prefixes_v6_chunks,
            prefixes_v6_skips,
            prefixes_v6_trie,
            counters,
            inner: object.inner.clone(),
            _rate: rate,
        };
        // The rules go in before the program runs on them: a fresh link filters
        // from its first packet; an adopted link's program shares these maps
        // (same layout) or is moved onto them by the update below.
        let prepared = maps.build(ruleset, config)?;
        // Start-up: if adopted maps had a ruleset switched in, the switch waits
        // for a grace period itself; that stalls nothing yet.
        maps.switch(&prepared, ReadersGone::NOT_WAITED)?;

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
pub(super) fn program_info(dir: &Path, program_id: u32) -> Option<ProgramInfo> {
    match ProgramInfo::from_pin(dir.join(pin_names::PROGRAM)) {
        Ok(info) if info.id() == program_id => Some(info),
        // Pinned program missing or another one: look it up among all programs.
        _ => loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p| p.id() == program_id),
    }
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
