//! The supervisor's own sd_notify conversation with systemd (when `NOTIFY_SOCKET`
//! is set for it): `READY=1`, `RELOADING=1` with `MONOTONIC_USEC` (what a
//! `Type=notify-reload` unit requires), `STATUS=`, `STOPPING=1`, watchdog pings.
//! Outside systemd every call is a no-op.
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("sd_notify: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading(status: &str) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
        Err(e) => tracing::warn!("reading CLOCK_MONOTONIC: {e}"),
    }
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half the interval systemd expects, or None.
///
/// Written out rather than `sd_notify::watchdog_enabled`, which also demands
/// `WATCHDOG_PID`: sd_watchdog_enabled(3) applies the watchdog to this process
/// when `WATCHDOG_PID` is unset, and only refuses when it names another process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// This process's environment without the supervisor's own variables: what its
/// workers inherit.
pub fn worker_inherited_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(key, _)| !is_supervisor_only_env(key))
        .collect()
}

/// Removes the supervisor's own systemd variables so its workers do not inherit them.
pub fn is_supervisor_only_env(key: &str) -> bool {
    matches!(
        key,
        "NOTIFY_SOCKET"
            | "LISTEN_PID"
            | "LISTEN_FDS"
            | "LISTEN_FDNAMES"
            | "WATCHDOG_USEC"
            | "WATCHDOG_PID"
            | "SUPERVISOR_GENERATION"
            | "SUPERVISOR_WORKER"
            | crate::reexec::HANDOFF_ENV
    )
}
