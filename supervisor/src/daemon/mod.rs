//! `supervisor run`: start-up, the event loop, and shutdown.
//!
//! There is one start-up path. A fresh start, the start of a supervisor that finds
//! the generations of one that died, and the start of a re-exec'd image differ
//! only in where each resource comes from ([`startup`]: created, taken over from
//! the pins, the state file and the running workers ([`recover`]), or handed over
//! by the previous image); all then assemble the same [`Daemon`], tell systemd
//! they are ready, and run the same event loop ([`event_loop`]).
//!
//! Everything runs on one thread (a current-thread tokio runtime on the main
//! thread): the state behind its lock is only ever touched between awaits, and
//! nothing in the daemon needs a second core.
mod event_loop;
mod recover;
mod startup;

pub use startup::Leftovers;

use std::{os::fd::RawFd, path::Path};

use anyhow::Result;
use tokio::net::UnixListener;

use crate::{config::Config, locks::ServiceLocks, reexec, systemd, upgrade::Shared};

/// A running supervisor's own resources, whichever way they were obtained.
pub struct Daemon {
    pub shared: Shared,
    /// The control socket's listener.
    pub control: UnixListener,
    /// The service's locks (runtime directory and pins), held for the daemon's
    /// life; dropping them at a clean stop removes the lock file.
    pub lock: ServiceLocks,
    /// The notify socket's fd (kept open across a re-exec).
    pub notify_fd: RawFd,
    /// The `/metrics` listener, with `[metrics]` (bound again by a re-exec'd image).
    pub metrics: Option<std::net::TcpListener>,
    /// The task that keeps the state file up to date (see `journal`).
    pub journal_writer: tokio::task::JoinHandle<()>,
}

/// `supervisor check`: refuses what [`run`] would refuse before it changes
/// anything, with the same message, and changes nothing itself.
pub fn check(config: &Config) -> Result<()> {
    startup::validate(config)
}

/// `supervisor cleanup`: discards what a supervisor of this service that died
/// left (its verified workers killed, its state file, control and notify sockets and
/// selector pins removed; the XDP link stays, as after every stop). Refused while a supervisor of the
/// service runs (it holds the locks). Returns how many processes were killed.
pub fn cleanup(config: &Config) -> Result<usize> {
    // No runtime directory: no supervisor ever ran with it, nothing of it to take.
    let runtime_lock = if config.service.runtime_dir.is_dir() {
        Some(crate::locks::lock_runtime(config)?)
    } else {
        None
    };
    let pin_dir = config.pin_dir();
    let _pins = pin_dir
        .is_dir()
        .then(|| crate::locks::lock_pins(config))
        .transpose()?;
    let killed = recover::discard(config);
    for listener in recover::listener_pins(&pin_dir) {
        let path = pin_dir.join(listener);
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
    let _ = std::fs::remove_dir(&pin_dir);
    // The dead daemon's control and notify sockets: nobody listens on them (we hold
    // the lock a running daemon would hold), and a stop must leave nothing in the
    // runtime dir.
    if runtime_lock.is_some() {
        for socket in [config.control_socket(), config.notify_socket()] {
            if let Err(e) = std::fs::remove_file(&socket)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("removing {}: {e}", socket.display());
            }
        }
    }
    Ok(killed)
}

/// Runs the daemon with `config`, loaded from `config_path` (before anything was
/// logged: a bad file is one error line).
pub async fn run(config_path: &Path, config: Config, leftovers: Leftovers) -> Result<()> {
    reexec::image_started();
    // The fds systemd hands back (its fd store) are taken before anything could
    // close or reuse their numbers.
    let stored = crate::fdstore::take();
    let daemon = match std::env::var_os(reexec::HANDOFF_ENV) {
        Some(handoff) => {
            let adopted = reexec::read(Path::new(&handoff))?;
            startup::adopt(&config, adopted)?
        }
        None => startup::start(&config, leftovers, stored).await?,
    };
    let serving = daemon.shared.lock().unwrap().serving();
    systemd::ready(&format!("generation {serving} serving"));
    event_loop::serve(daemon, config_path).await
}
