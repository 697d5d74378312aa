//! Where a daemon's resources come from: created by a fresh start, taken over
//! from a supervisor of the service that died ([`super::recover`]), or from the
//! previous image by a re-exec. All end in [`assemble`].
//!
//! A fresh start checks everything an operator can get wrong before it changes
//! anything (config, the runtime directory, the locks, privileges, the port, the
//! command), and undoes what it did if a later step fails ([`Undo`]): a refused or
//! failed start leaves no pins, mount, sockets, lock file or processes.
use std::{
    os::fd::{AsFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Result;
use tokio::net::UnixListener;

use super::{Daemon, recover};
use crate::{
    bpffs,
    config::Config,
    control,
    dataplane::Dataplane,
    error::InputError,
    journal::{self, Journal},
    locks::{self, HeldLock, ServiceLocks},
    maps::ListenerDataplane,
    notify::{NotifySocket, Registry},
    process::ForkExec,
    reexec::{self, Adopted},
    sockets, systemd, trust,
    upgrade::{self, Generation, Progress, Shared, State},
    worker::{SlotContext, WorkerSpec},
    xdp::{self, XdpFilter},
};

/// What both start-up paths produce.
struct Parts {
    config: Config,
    lock: ServiceLocks,
    dataplanes: Vec<Box<dyn Dataplane>>,
    xdp: Option<XdpFilter>,
    notify: NotifySocket,
    control: UnixListener,
    spec: WorkerSpec,
    /// How workers start, where their notify messages go, the state file.
    context: SlotContext,
    generations: Vec<Generation>,
    next_generation: u32,
    metrics: Option<std::net::TcpListener>,
}

/// The slot context of a daemon of `config`: real processes, a fresh notify
/// registry, the service's state file.
fn slot_context(config: &Config) -> SlotContext {
    SlotContext {
        launcher: Arc::new(ForkExec),
        registry: Registry::default(),
        journal: Journal::at(journal::path(config)),
    }
}

/// Starts the notify reader and the state file's writer, and puts the state together.
fn assemble(parts: Parts) -> Daemon {
    let notify_fd = parts.notify.raw_fd();
    tokio::spawn(parts.notify.serve(parts.context.registry.clone()));
    let journal = parts.context.journal.clone();
    let mut state = State::new(
        parts.config,
        parts.dataplanes,
        Arc::new(parts.spec),
        parts.context,
        parts.xdp,
    );
    state.generations = parts.generations;
    state.next_generation = parts.next_generation;
    let shared: Shared = Arc::new(Mutex::new(state));
    let journal_writer = tokio::spawn(journal.clone().write_on_mark(shared.clone()));
    journal.mark();
    Daemon {
        shared,
        control: parts.control,
        lock: parts.lock,
        notify_fd,
        metrics: parts.metrics,
        journal_writer,
    }
}

/// What a fresh start changed so far, undone in reverse if it fails: the first
/// generation's teardown has already stopped its workers by then.
#[derive(Default)]
struct Undo {
    runtime_dirs: Vec<PathBuf>,
    runtime_lock: Option<HeldLock>,
    bpffs: Option<bpffs::Prepared>,
    pin_lock: Option<HeldLock>,
    pin_dir: PathBuf,
    dataplanes: Vec<Box<dyn Dataplane>>,
    /// The XDP filter when this start attached it (an adopted one stays).
    xdp_attached: Option<XdpFilter>,
    control_socket: Option<PathBuf>,
    /// The state file, once a first generation may have been recorded in it.
    state_file: Option<PathBuf>,
    notify_socket: Option<PathBuf>,
    /// Once assembled, the dataplanes and the filter live in the state.
    shared: Option<(Shared, bool)>,
}

impl Undo {
    fn run(mut self) {
        if let Some((shared, xdp_attached)) = self.shared.take() {
            let mut state = shared.lock().unwrap();
            self.dataplanes = std::mem::take(&mut state.dataplanes);
            let filter = state.xdp.take();
            if xdp_attached {
                self.xdp_attached = filter;
            }
        }
        if let Some(filter) = self.xdp_attached.take() {
            let interface = filter.interface().to_string();
            if let Err(e) = filter.remove() {
                tracing::warn!("removing the XDP filter this start attached to {interface}: {e:#}");
            }
        }
        for path in [&self.control_socket, &self.notify_socket]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(path);
        }
        if let Some(path) = &self.state_file {
            journal::remove(path);
        }
        // Pins go while the pin lock is held, the mount once they are gone, the
        // lock file while its lock is held, the runtime directory once it is empty.
        unpin(&self.dataplanes, &self.pin_dir);
        drop(self.pin_lock.take());
        if let Some(prepared) = self.bpffs.take() {
            prepared.undo();
        }
        drop(self.runtime_lock.take());
        trust::remove_dirs(&self.runtime_dirs);
    }
}

/// What `supervisor run` was told about what a previous supervisor left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftovers {
    /// Take it over; refuse what cannot be (the default).
    Adopt,
    /// Discard it and start fresh (`run --fresh`).
    Discard,
}

/// A start: generations a supervisor of this service left are taken over
/// ([`recover`]), or, when there are none, everything is created here and
/// generation 1 is built by the same state machine as every upgrade.
/// `stored`: the sockets systemd's fd store handed back.
pub(super) async fn start(
    config: &Config,
    leftovers: Leftovers,
    stored: Vec<OwnedFd>,
) -> Result<Daemon> {
    // Checked before anything is created: a missing command or user is bad input.
    WorkerSpec::from_config(config, String::new())?;
    let mut undo = Undo {
        pin_dir: config.pin_dir(),
        ..Undo::default()
    };
    match start_with(config, leftovers, stored, &mut undo).await {
        Ok(daemon) => Ok(daemon),
        Err(e) => {
            undo.run();
            Err(e)
        }
    }
}

/// What [`fresh`] refuses before it changes anything, decided without changing
/// anything (`supervisor check`): the worker command and user, the runtime
/// directory's trust, another supervisor holding the service's locks (read from
/// /proc/locks: no lock file is created or locked), the bpffs path (and a mount it
/// would need), listener addresses held by another program, and the privileges
/// bpf() needs. Same order, same messages. Not checked: what only trying can tell
/// (the selector loading, the XDP attach, the first generation starting).
pub(super) fn validate(config: &Config) -> Result<()> {
    WorkerSpec::from_config(config, String::new())?;
    trust::check_runtime_dir_path(
        &config.service.runtime_dir,
        &config.key("service.runtime_dir"),
    )?;
    locks::check_runtime_lock(config)?;
    bpffs::check(&config.service.bpffs, &config.key("service.bpffs"))?;
    locks::check_pin_lock(config)?;
    // A previous supervisor's workers hold the addresses when there is
    // something to take over; `run` would refuse what cannot be taken over.
    if recover::find(config)?.is_none() {
        for listener in &config.listeners {
            sockets::check_address(listener.address, &listener.name)?;
        }
    }
    // The metrics port as `start` binds it, closed again at once: a listening
    // socket that never accepted leaves nothing behind.
    drop(bind_metrics(config)?);
    if !crate::procfs::has_effective_capability(bpffs::CAP_BPF)
        && !crate::procfs::has_effective_capability(bpffs::CAP_SYS_ADMIN)
    {
        return Err(crate::error::InputError::new(
            "missing privileges for bpf(): this process has neither CAP_BPF nor CAP_SYS_ADMIN; \
             run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
        )
        .into());
    }
    Ok(())
}

async fn start_with(
    config: &Config,
    leftovers: Leftovers,
    stored: Vec<OwnedFd>,
    undo: &mut Undo,
) -> Result<Daemon> {
    let service = config.service.name.clone();
    undo.runtime_dirs = trust::prepare_runtime_dir(
        &config.service.runtime_dir,
        &config.key("service.runtime_dir"),
    )?;
    undo.runtime_lock = Some(locks::lock_runtime(config)?);
    undo.bpffs = Some(bpffs::prepare(
        &config.service.bpffs,
        &config.key("service.bpffs"),
    )?);
    undo.pin_lock = Some(locks::lock_pins(config)?);
    match leftovers {
        Leftovers::Adopt => {
            if let Some(snapshot) = recover::find(config)? {
                return take_over(config, snapshot, stored, undo).await;
            }
        }
        Leftovers::Discard => {
            let killed = recover::discard(config);
            if killed > 0 {
                tracing::warn!("--fresh: killed {killed} processes a previous supervisor left");
            }
        }
    }
    // A fresh start: sockets systemd still stores are of no generation now.
    forget_stored(stored);
    // Recorded before anything is pinned (see `journal::Snapshot::empty`).
    let state_file = journal::path(config);
    journal::write(
        &state_file,
        &journal::Snapshot::empty(config, &WorkerSpec::from_config(config, String::new())?),
    )?;
    undo.state_file = Some(state_file);
    // Before anything is pinned or attached: an address another program holds.
    for listener in &config.listeners {
        sockets::check_address(listener.address, &listener.name)?;
    }
    // The metrics port, before anything is pinned: taken or unusable is bad
    // input, and the undo has only the directory and the locks to remove.
    let metrics = bind_metrics(config)?;

    let pin_dir = config.pin_dir();
    for listener in &config.listeners {
        // A listener that fails to load removes its own pins.
        undo.dataplanes.push(Box::new(ListenerDataplane::load(
            &listener.name,
            &pin_dir.join(&listener.name),
            listener.flow_table_size,
        )?));
    }
    // The XDP filter: adopted from a previous run when its link is pinned,
    // attached otherwise; a stale one of ours is removed when the config has no
    // [xdp]. One this start attached is removed again if the start fails.
    let mut xdp_attached = false;
    let xdp = match &config.xdp {
        Some(xdp) => {
            let before = pinned_xdp_link(&pin_dir, &xdp.interface);
            let filter = XdpFilter::start(xdp, &pin_dir, &config.listener_addresses())?;
            xdp_attached = before != Some(filter.link_id());
            if xdp_attached {
                undo.xdp_attached = Some(filter);
                None
            } else {
                Some(filter)
            }
        }
        None => {
            xdp::remove_stale(&pin_dir)?;
            None
        }
    };
    // In the runtime directory checked above (root's, writable by nobody else):
    // nobody else can bind the path first or replace it.
    let notify = NotifySocket::bind(&config.notify_socket())?;
    undo.notify_socket = Some(config.notify_socket());
    undo.control_socket = Some(config.control_socket());
    let control = control::bind(&config.control_socket())?;
    let spec = WorkerSpec::from_config(config, notify.env_value.clone())?;

    let daemon = assemble(Parts {
        config: config.clone(),
        lock: ServiceLocks {
            runtime: undo.runtime_lock.take().expect("taken above"),
            pins: undo.pin_lock.take().expect("taken above"),
        },
        dataplanes: std::mem::take(&mut undo.dataplanes),
        xdp: xdp.or(undo.xdp_attached.take()),
        notify,
        control,
        spec,
        context: slot_context(config),
        generations: Vec::new(),
        next_generation: 1,
        metrics,
    });
    let shared = daemon.shared.clone();
    undo.shared = Some((shared.clone(), xdp_attached));
    if let Err(e) = first_generation(&shared, config).await {
        // The locks stay held until the undo is done.
        let Daemon { lock, .. } = daemon;
        undo.runtime_lock = Some(lock.runtime);
        undo.pin_lock = Some(lock.pins);
        return Err(e.context(format!(
            "service {service}: the first generation did not start"
        )));
    }
    Ok(daemon)
}

/// Builds and flips to a generation with nothing serving before (the first one,
/// or the one that replaces a generation whose sockets died with its workers).
async fn first_generation(shared: &Shared, config: &Config) -> Result<()> {
    let spec = shared.lock().unwrap().spec.clone();
    let progress = Progress::new(None);
    let number = upgrade::begin(shared, config, &progress)?;
    upgrade::run(shared, number, config.clone(), spec, &progress).await?;
    Ok(())
}

/// Sockets the fd store handed back that no generation will use: out of the
/// store (else systemd would keep them, and their addresses, forever).
fn forget_stored(stored: Vec<OwnedFd>) {
    let cookies: Vec<u64> = stored
        .iter()
        .filter_map(|fd| crate::sys::socket_cookie(fd.as_fd()).ok())
        .collect();
    crate::fdstore::remove(&cookies);
}

/// The start of a supervisor that finds generations a dead one left: the pins
/// and the workers are taken over as they are (see [`recover`]); only the
/// daemon's own sockets are made anew. A failure here leaves them as they were
/// (the undo has only the control socket and the locks to release) for the next
/// attempt, or for `--fresh`.
async fn take_over(
    config: &Config,
    snapshot: journal::Snapshot,
    stored: Vec<OwnedFd>,
    undo: &mut Undo,
) -> Result<Daemon> {
    let service = config.service.name.clone();
    let metrics = bind_metrics(config)?;
    let pin_dir = config.pin_dir();
    let mut dataplanes = config
        .listeners
        .iter()
        .map(|l| -> Result<Box<dyn Dataplane>> {
            Ok(Box::new(
                ListenerDataplane::adopt(&l.name, &pin_dir.join(&l.name)).map_err(|e| {
                    InputError::new(format!(
                        "service {service}: listener {:?} of the config has no usable pins to take over ({e:#}); \
                         a listener cannot be added to a running service (not by an upgrade either): \
                         start with the config the workers run under, or with `supervisor run --fresh`",
                        l.name
                    ))
                })?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    recover::check(config, &snapshot, &dataplanes)?;
    let xdp = adopt_xdp(config, &pin_dir)?;
    // The same path as the dead supervisor's: its workers can still notify.
    let notify = NotifySocket::bind(&config.notify_socket())?;
    undo.notify_socket = Some(config.notify_socket());
    undo.control_socket = Some(config.control_socket());
    let control = control::bind(&config.control_socket())?;
    let inherited_env = systemd::worker_inherited_env();
    let spec = snapshot
        .spec
        .to_spec(inherited_env, notify.env_value.clone())?;
    let context = slot_context(config);
    let recovered = recover::recover(config, snapshot, &dataplanes, stored, &context, spec)?;
    // This build's selector, if the dead supervisor ran another, goes in now
    // (its group found through the serving generation's recovered sockets).
    let serving = recovered
        .generations
        .iter()
        .find(|g| g.state == upgrade::GenerationState::Serving);
    for (index, listener) in config.listeners.iter().enumerate() {
        let group: Vec<_> = serving
            .and_then(|g| g.listeners.get(index))
            .map(|l| {
                l.sockets
                    .iter()
                    .map(|s| s.as_fd())
                    .filter(|s| sockets::is_bound(*s))
                    .collect()
            })
            .unwrap_or_default();
        let dir = pin_dir.join(&listener.name);
        match crate::selector_swap::take_effect(&dir, &group) {
            Ok(crate::selector_swap::Swap::Unchanged) => {}
            Ok(swap) => {
                tracing::info!("listener {}: {swap}", listener.name);
                // Its maps may be new: opened again from the pins.
                dataplanes[index] = Box::new(ListenerDataplane::adopt(&listener.name, &dir)?);
            }
            Err(e) => tracing::warn!(
                "listener {}: keeping the pinned selector of the previous build: {e:#}",
                listener.name
            ),
        }
    }
    let daemon = assemble(Parts {
        config: config.clone(),
        lock: ServiceLocks {
            runtime: undo.runtime_lock.take().expect("taken by start_with"),
            pins: undo.pin_lock.take().expect("taken by start_with"),
        },
        dataplanes,
        xdp,
        notify,
        control,
        spec: recovered.spec,
        context,
        generations: recovered.generations,
        next_generation: recovered.next_generation,
        metrics,
    });
    upgrade::resume_drains(&daemon.shared);
    if recovered.needs_new_generation {
        tracing::warn!(
            "service {service}: no generation serves with all its sockets; starting a new one while the survivors serve"
        );
        // A failure is this start's failure; what was taken over stays as it is.
        first_generation(&daemon.shared, config)
            .await
            .map_err(|e| {
                e.context(format!(
                    "service {service}: the new generation did not start"
                ))
            })?;
    }
    Ok(daemon)
}

/// The XDP filter of a start that takes over (a re-exec, or after a crash): the
/// pinned link adopted, or attached if there is none.
fn adopt_xdp(config: &Config, pin_dir: &Path) -> Result<Option<XdpFilter>> {
    config
        .xdp
        .as_ref()
        .map(|xdp| XdpFilter::start(xdp, pin_dir, &config.listener_addresses()))
        .transpose()
}

/// Binds `[metrics] listen`, if configured; a failure names the key.
fn bind_metrics(config: &Config) -> Result<Option<std::net::TcpListener>> {
    let Some(metrics) = &config.metrics else {
        return Ok(None);
    };
    let key = config.key("metrics.listen");
    let address = metrics
        .address()
        .map_err(|why| InputError::new(format!("{key}: {why}")))?;
    crate::metrics::http::bind(address)
        .map(Some)
        .map_err(|e| InputError::new(format!("{key}: cannot listen on {address}: {e}")).into())
}

/// The id of the XDP link pinned for `interface`, if one is there and opens.
fn pinned_xdp_link(pin_dir: &Path, interface: &str) -> Option<u32> {
    use supervisor_common::xdp::pin_names;
    let path = pin_dir
        .join(pin_names::XDP_DIR)
        .join(interface)
        .join(pin_names::LINK);
    let link = aya::programs::links::PinnedLink::from_pin(&path).ok()?;
    aya::programs::links::FdLink::from(link)
        .info()
        .ok()
        .map(|info| info.id())
}

/// The start of a re-exec'd image: everything taken over, nothing started.
pub(super) fn adopt(config: &Config, adopted: Adopted) -> Result<Daemon> {
    let lock = ServiceLocks {
        runtime: locks::adopt(adopted.lock, config.lock_file(), true)?,
        pins: match adopted.pin_lock {
            Some(fd) => locks::adopt(fd, config.pin_dir(), false)?,
            // Handed over by an image that did not hold it: taken now.
            None => locks::lock_pins(config)?,
        },
    };
    let pin_dir = config.pin_dir();
    let dataplanes = config
        .listeners
        .iter()
        .map(|l| -> Result<Box<dyn Dataplane>> {
            // The serving generation's sockets: the group a new build's selector
            // is attached to (see `selector_swap`).
            let group = (adopted.handoff.generation.listeners.iter())
                .position(|h| h.name == l.name)
                .map(|i| adopted.sockets[i].iter().map(|s| s.as_fd()).collect())
                .unwrap_or_else(Vec::new);
            let dir = pin_dir.join(&l.name);
            Ok(Box::new(crate::selector_swap::adopt_current(
                &l.name, &dir, &group,
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    let xdp = adopt_xdp(config, &pin_dir)?;
    let notify = NotifySocket::from_fd(adopted.notify, adopted.handoff.notify_name.clone())?;
    let control = std::os::unix::net::UnixListener::from(adopted.control);
    control.set_nonblocking(true)?;
    let control = UnixListener::from_std(control)?;
    let inherited_env = systemd::worker_inherited_env();
    let spec = reexec::spec(&adopted.handoff, inherited_env)?;
    let context = slot_context(config);
    let generation = reexec::adopt_generation(
        &adopted.handoff,
        adopted.sockets,
        &pin_dir,
        &Arc::new(spec.clone()),
        &context,
    )?;
    tracing::info!(
        "re-executed: adopted generation {} and its {} workers",
        generation.number,
        generation.workers.len()
    );
    // The previous image's listener closed at exec (close-on-exec). Failing to
    // bind it again must not stop a service that runs: said, and served without.
    let metrics = bind_metrics(config).unwrap_or_else(|e| {
        tracing::error!("{e:#}; serving without metrics");
        None
    });
    Ok(assemble(Parts {
        config: config.clone(),
        lock,
        metrics,
        dataplanes,
        xdp,
        notify,
        control,
        spec,
        context,
        generations: vec![generation],
        next_generation: adopted.handoff.next_generation,
    }))
}

/// Removes the listeners' selector pins, and the service directory when nothing
/// else (an XDP link, which outlives the supervisor by design) is left in it.
pub(super) fn unpin(dataplanes: &[Box<dyn Dataplane>], pin_dir: &Path) {
    for dataplane in dataplanes {
        dataplane.unpin_all();
    }
    let _ = std::fs::remove_dir(pin_dir);
}

/// The fd numbers a re-exec hands over (see `reexec`).
pub(super) fn handoff_fds(
    locks: &ServiceLocks,
    notify: RawFd,
    control: &UnixListener,
) -> reexec::DaemonFds {
    use std::os::fd::AsRawFd;
    reexec::DaemonFds {
        lock: locks.runtime.raw_fd(),
        pin_lock: locks.pins.raw_fd(),
        notify,
        control: control.as_raw_fd(),
    }
}
