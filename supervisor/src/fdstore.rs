//! Sockets kept in systemd's file-descriptor store (`FDSTORE=1`), so they
//! survive systemd cleaning up the unit's processes, and what queued in them
//! meanwhile is still served by the supervisor that systemd starts next.
//!
//! Every socket of every generation is stored under the name `sock-<cookie>` (its
//! `SO_COOKIE`, which the state file also records) and removed when its
//! generation retires. At start systemd hands the stored fds back as
//! `LISTEN_FDS`/`LISTEN_FDNAMES`; recovery matches them by cookie, never by name
//! or position. The unit needs `FileDescriptorStoreMax=` (0, systemd's default,
//! turns the store off: then the messages are ignored by systemd).
//!
//! Outside systemd (no `NOTIFY_SOCKET` for the supervisor) every call is a no-op.
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use sd_notify::NotifyState;

const NAME_PREFIX: &str = "sock-";

fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Stores each socket under its cookie's name.
pub fn store(sockets: &[(u64, BorrowedFd<'_>)]) {
    if !under_systemd() {
        return;
    }
    for (cookie, fd) in sockets {
        let name = format!("{NAME_PREFIX}{cookie}");
        let states = [NotifyState::FdStore, NotifyState::FdName(&name)];
        if let Err(e) = sd_notify::notify_with_fds(false, &states, &[*fd]) {
            tracing::warn!("FDSTORE of socket {name}: {e}");
        }
    }
}

/// Removes the sockets with these cookies from the store.
pub fn remove(cookies: &[u64]) {
    if !under_systemd() {
        return;
    }
    for cookie in cookies {
        let name = format!("{NAME_PREFIX}{cookie}");
        let states = [NotifyState::FdStoreRemove, NotifyState::FdName(&name)];
        if let Err(e) = sd_notify::notify(false, &states) {
            tracing::warn!("FDSTOREREMOVE of socket {name}: {e}");
        }
    }
}

/// The sockets systemd handed back at start (`LISTEN_FDS` with names
/// `sock-...`), close-on-exec; the variables are removed so no worker sees them.
pub fn take() -> Vec<OwnedFd> {
    let Ok(fds) = sd_notify::listen_fds_with_names(true) else {
        return Vec::new();
    };
    fds.filter_map(|(fd, name)| {
        // Taken before this process opens anything (see `daemon::run`).
        let owned = crate::sys::take_inherited_fd(fd).ok()?;
        let _ = crate::sys::set_cloexec(owned.as_raw_fd(), true);
        if name.starts_with(NAME_PREFIX) {
            Some(owned)
        } else {
            tracing::warn!("ignoring fd {fd} ({name}) passed by systemd: not a stored socket");
            None
        }
    })
    .collect()
}
