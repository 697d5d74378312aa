//! `supervisor run`: start-up, the event loop, and shutdown.
//!
//! There is one start-up path. A fresh start and the start of a re-exec'd image
//! differ only in where each resource comes from ([`startup`]: created, or taken
//! over from the previous image); both then assemble the same [`Daemon`], tell
//! systemd they are ready, and run the same event loop ([`event_loop`]).
//!
//! Everything runs on one thread (a current-thread tokio runtime on the main
//! thread). That is a correctness choice, not only a simple one: workers are forked
//! with `PR_SET_PDEATHSIG`, which is tied to the forking thread.
mod event_loop;
mod startup;

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
}

/// `supervisor check`: refuses what [`run`] would refuse before it changes
/// anything, with the same message, and changes nothing itself.
pub fn check(config: &Config) -> Result<()> {
    startup::validate(config)
}

/// Runs the daemon with `config`, loaded from `config_path` (before anything was
/// logged: a bad file is one error line).
pub async fn run(config_path: &Path, config: Config) -> Result<()> {
    reexec::image_started();
    let daemon = match std::env::var_os(reexec::HANDOFF_ENV) {
        Some(handoff) => {
            let adopted = reexec::read(Path::new(&handoff))?;
            startup::adopt(&config, adopted)?
        }
        None => startup::fresh(&config).await?,
    };
    let serving = daemon.shared.lock().unwrap().serving();
    systemd::ready(&format!("generation {serving} serving"));
    event_loop::serve(daemon, config_path).await
}
