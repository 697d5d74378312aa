//! Where a daemon's resources come from: created by a fresh start, or taken over
//! from the previous image by a re-exec. Both end in [`assemble`].
//!
//! A fresh start checks everything an operator can get wrong before it changes
//! anything (config, privileges, the port, the command), and undoes what it did if
//! a later step fails: a refused start leaves no pins, sockets or processes.
use std::{
    fs::File,
    os::fd::RawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;

use super::Daemon;
use crate::{
    bpffs,
    config::Config,
    control,
    dataplane::Dataplane,
    error::InputError,
    maps::ListenerDataplane,
    notify::{NotifySocket, Registry},
    process::ForkExec,
    reexec::{self, Adopted},
    systemd,
    upgrade::{self, Generation, Progress, Shared, State},
    worker::{SlotContext, WorkerSpec},
    xdp::{self, XdpFilter},
};

/// What both start-up paths produce.
struct Parts {
    config: Config,
    lock: Flock<File>,
    dataplanes: Vec<Box<dyn Dataplane>>,
    xdp: Option<XdpFilter>,
    notify: NotifySocket,
    control: UnixListener,
    spec: WorkerSpec,
    registry: Registry,
    generations: Vec<Generation>,
    next_generation: u32,
}

/// Starts the notify reader and puts the state together.
fn assemble(parts: Parts) -> Daemon {
    let notify_fd = parts.notify.raw_fd();
    tokio::spawn(parts.notify.serve(parts.registry.clone()));
    let mut state = State::new(
        parts.config,
        parts.dataplanes,
        Arc::new(parts.spec),
        SlotContext {
            launcher: Arc::new(ForkExec),
            registry: parts.registry,
        },
        parts.xdp,
    );
    state.generations = parts.generations;
    state.next_generation = parts.next_generation;
    let shared: Shared = Arc::new(Mutex::new(state));
    Daemon {
        shared,
        control: parts.control,
        lock: parts.lock,
        notify_fd,
    }
}

/// A fresh start: everything created here, then generation 1 built by the same
/// state machine as every upgrade.
pub(super) async fn fresh(config: &Config) -> Result<Daemon> {
    let service = config.service.name.clone();
    std::fs::create_dir_all(&config.service.runtime_dir).map_err(|e| {
        InputError::new(format!(
            "cannot create runtime_dir {}: {e}",
            config.service.runtime_dir.display()
        ))
    })?;
    let lock = lock(config)?;
    // Checked before anything is created: a missing command or user is bad input.
    WorkerSpec::from_config(config, String::new())?;
    bpffs::ensure(&config.service.bpffs)?;

    let pin_dir = config.pin_dir();
    let mut dataplanes: Vec<Box<dyn Dataplane>> = Vec::new();
    let resources = (|| -> Result<_> {
        for listener in &config.listeners {
            // A listener that fails to load removes its own pins.
            dataplanes.push(Box::new(ListenerDataplane::load(
                &listener.name,
                &pin_dir.join(&listener.name),
                listener.flow_table_size,
            )?));
        }
        // The XDP filter: adopted from a previous run when its link is pinned,
        // attached otherwise; a stale one of ours is removed when the config has
        // no [xdp].
        let xdp = match &config.xdp {
            Some(xdp) => Some(XdpFilter::start(
                xdp,
                &pin_dir,
                &config.listener_addresses(),
            )?),
            None => {
                xdp::remove_stale(&pin_dir)?;
                None
            }
        };
        let notify = NotifySocket::bind(&service)?;
        let control = control::bind(&config.control_socket())?;
        let spec = WorkerSpec::from_config(config, notify.env_value.clone())?;
        Ok((xdp, notify, control, spec))
    })();
    let (xdp, notify, control, spec) = match resources {
        Ok(resources) => resources,
        Err(e) => {
            unpin(&dataplanes, &pin_dir);
            return Err(e);
        }
    };

    let daemon = assemble(Parts {
        config: config.clone(),
        lock,
        dataplanes,
        xdp,
        notify,
        control,
        spec,
        registry: Registry::default(),
        generations: Vec::new(),
        next_generation: 1,
    });
    let shared = &daemon.shared;
    let spec = shared.lock().unwrap().spec.clone();
    let progress = Progress::new(None);
    let first = upgrade::begin(shared, config, &progress)?;
    if let Err(e) = upgrade::run(shared, first, config.clone(), spec, &progress).await {
        unpin(&shared.lock().unwrap().dataplanes, &pin_dir);
        let _ = std::fs::remove_file(config.control_socket());
        return Err(e.context(format!(
            "service {service}: the first generation did not start"
        )));
    }
    Ok(daemon)
}

/// The start of a re-exec'd image: everything taken over, nothing started.
pub(super) fn adopt(config: &Config, adopted: Adopted) -> Result<Daemon> {
    let lock = Flock::lock(File::from(adopted.lock), FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::anyhow!("re-taking the service lock: {e}"))?;
    let pin_dir = config.pin_dir();
    let dataplanes = config
        .listeners
        .iter()
        .map(|l| -> Result<Box<dyn Dataplane>> {
            Ok(Box::new(ListenerDataplane::adopt(
                &l.name,
                &pin_dir.join(&l.name),
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    let xdp = match &config.xdp {
        Some(xdp) => Some(XdpFilter::start(
            xdp,
            &pin_dir,
            &config.listener_addresses(),
        )?),
        None => None,
    };
    let notify = NotifySocket::from_fd(adopted.notify, adopted.handoff.notify_name.clone())?;
    let control = std::os::unix::net::UnixListener::from(adopted.control);
    control.set_nonblocking(true)?;
    let control = UnixListener::from_std(control)?;
    let inherited_env = std::env::vars()
        .filter(|(key, _)| !systemd::is_supervisor_only_env(key))
        .collect();
    let spec = reexec::spec(&adopted.handoff, inherited_env)?;
    let registry = Registry::default();
    let context = SlotContext {
        launcher: Arc::new(ForkExec),
        registry: registry.clone(),
    };
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
    Ok(assemble(Parts {
        config: config.clone(),
        lock,
        dataplanes,
        xdp,
        notify,
        control,
        spec,
        registry,
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

/// One supervisor per service: an exclusive, non-blocking flock on
/// `<runtime_dir>/<service>.lock`, released by the kernel when we die.
fn lock(config: &Config) -> Result<Flock<File>> {
    let path = config.lock_file();
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| InputError::new(format!("cannot open lock file {}: {e}", path.display())))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        InputError::new(format!(
            "another supervisor is already running service {:?} (lock {} is held: {e})",
            config.service.name,
            path.display()
        ))
        .into()
    })
}

/// The fd numbers a re-exec hands over (see `reexec`).
pub(super) fn handoff_fds(
    daemon_lock: &Flock<File>,
    notify: RawFd,
    control: &UnixListener,
) -> reexec::DaemonFds {
    use std::os::fd::AsRawFd;
    reexec::DaemonFds {
        lock: daemon_lock.as_raw_fd(),
        notify,
        control: control.as_raw_fd(),
    }
}
