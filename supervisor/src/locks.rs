//! One supervisor per service, on both things a service's supervisors share.
//!
//! - The runtime lock, `flock` on `<runtime_dir>/<service>.lock`: the control
//!   socket and the handoff file live next to it.
//! - The pin lock, `flock` on the pin directory `<bpffs>/<service>/` itself
//!   (bpffs has no regular files, but a directory opened read-only takes a
//!   `flock` like any file): pins are per service name, whatever the runtime
//!   directory, so two supervisors of one name with two runtime directories
//!   would otherwise delete each other's live pins.
//!
//! Both are released by the kernel when the process dies, and survive a re-exec
//! as inherited fds. A clean stop removes the lock file while it still holds the
//! lock. Whoever locks checks afterwards that the path still names the file it
//! locked (a stopping supervisor may just have removed it) and tries again if not.
use std::{
    fs::{self, File, OpenOptions},
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::{config::Config, error::InputError, procfs};

/// A held `flock`, released on drop; a lock file is removed first.
pub struct HeldLock {
    lock: Flock<File>,
    path: PathBuf,
    remove_on_drop: bool,
}

impl HeldLock {
    pub fn raw_fd(&self) -> RawFd {
        self.lock.as_raw_fd()
    }

    /// Whether `path` still names the file this lock is on.
    fn still_at_path(&self) -> bool {
        match (fs::symlink_metadata(&self.path), self.lock.metadata()) {
            (Ok(at_path), Ok(held)) => at_path.dev() == held.dev() && at_path.ino() == held.ino(),
            _ => false,
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        // Still holding the lock: nobody else can be using the file now, and
        // anyone who opened it meanwhile will see it is gone and create a new one.
        if self.remove_on_drop && self.still_at_path() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Both locks of a running supervisor.
pub struct ServiceLocks {
    pub runtime: HeldLock,
    pub pins: HeldLock,
}

/// How many times a lock is tried when its file keeps disappearing under us.
const ATTEMPTS: usize = 5;

/// Locks `<runtime_dir>/<service>.lock` (created 0600, never through a symlink).
pub fn lock_runtime(config: &Config) -> Result<HeldLock> {
    let path = config.lock_file();
    lock_path(&path, true, || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .and_then(|file| {
                // One left by an older version may be readable by others, and
                // whoever can open it can hold the lock.
                file.set_permissions(fs::Permissions::from_mode(0o600))?;
                Ok(file)
            })
            .map_err(|e| {
                InputError::new(format!("cannot open the lock file {}: {e}", path.display())).into()
            })
    })
    .map_err(|e| match e {
        LockError::Held(pids) => runtime_held(config, &path, &pids),
        LockError::Other(e) => e,
    })
}

fn runtime_held(config: &Config, path: &Path, pids: &[i32]) -> anyhow::Error {
    InputError::new(format!(
        "another supervisor is already running service {:?}: {} holds the lock {}",
        config.service.name,
        holders(pids),
        path.display()
    ))
    .into()
}

fn pins_held(config: &Config, dir: &Path, pids: &[i32]) -> anyhow::Error {
    InputError::new(format!(
        "service {:?}'s pins in {} are in use by another supervisor ({}), probably one with another runtime_dir; \
         two supervisors of one service would delete each other's pins",
        config.service.name,
        dir.display(),
        holders(pids)
    ))
    .into()
}

/// Who holds an flock on `path`, from /proc/locks: nothing is opened, created or
/// locked (`supervisor check`). `None` when `path` is missing or nobody holds one.
fn held_by(path: &Path) -> Option<Vec<i32>> {
    let meta = fs::symlink_metadata(path).ok()?;
    let text = fs::read_to_string("/proc/locks").ok()?;
    let pids = procfs::flock_holders_in(&text, meta.dev(), meta.ino())?;
    Some(pids)
}

/// What [`lock_runtime`] refuses (another supervisor holds the service's lock),
/// told without touching the lock file.
pub fn check_runtime_lock(config: &Config) -> Result<()> {
    let path = config.lock_file();
    match held_by(&path) {
        Some(pids) => Err(runtime_held(config, &path, &pids)),
        None => Ok(()),
    }
}

/// What [`lock_pins`] refuses, told without creating or locking the pin directory.
pub fn check_pin_lock(config: &Config) -> Result<()> {
    let dir = config.pin_dir();
    match held_by(&dir) {
        Some(pids) => Err(pins_held(config, &dir, &pids)),
        None => Ok(()),
    }
}

/// Locks the pin directory `<bpffs>/<service>/`, creating it (mode 0700) if it is
/// missing. It must be owned by root or us.
pub fn lock_pins(config: &Config) -> Result<HeldLock> {
    let dir = config.pin_dir();
    lock_path(&dir, false, || {
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(InputError::new(format!(
                    "{}: cannot create the pin directory {}: {e}",
                    config.key("service.bpffs"),
                    dir.display()
                ))
                .into());
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&dir)
            .with_context(|| format!("opening the pin directory {}", dir.display()))?;
        let owner = file.metadata()?.uid();
        if owner != 0 && owner != nix::unistd::geteuid().as_raw() {
            return Err(InputError::new(format!(
                "{}: the pin directory {} is owned by uid {owner}, another user",
                config.key("service.bpffs"),
                dir.display()
            ))
            .into());
        }
        // One made by an older version may be open to others, and whoever can
        // open it can hold its lock.
        file.set_permissions(fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
        Ok(file)
    })
    .map_err(|e| match e {
        LockError::Held(pids) => pins_held(config, &dir, &pids),
        LockError::Other(e) => e,
    })
}

/// Takes over a lock a previous image of this process held (re-exec).
pub fn adopt(fd: OwnedFd, path: PathBuf, remove_on_drop: bool) -> Result<HeldLock> {
    let lock = Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::anyhow!("re-taking the lock on {}: {e}", path.display()))?;
    Ok(HeldLock {
        lock,
        path,
        remove_on_drop,
    })
}

enum LockError {
    /// Someone else holds it (these pids, as far as this process can see).
    Held(Vec<i32>),
    Other(anyhow::Error),
}

fn lock_path(
    path: &Path,
    remove_on_drop: bool,
    open: impl Fn() -> Result<File>,
) -> Result<HeldLock, LockError> {
    for _ in 0..ATTEMPTS {
        let file = open().map_err(LockError::Other)?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, Errno::EWOULDBLOCK)) => {
                let pids = file
                    .metadata()
                    .map(|m| procfs::flock_holders(m.dev(), m.ino()))
                    .unwrap_or_default();
                return Err(LockError::Held(pids));
            }
            Err((_, e)) => {
                return Err(LockError::Other(anyhow::anyhow!(
                    "locking {}: {e}",
                    path.display()
                )));
            }
        };
        let mut held = HeldLock {
            lock,
            path: path.to_path_buf(),
            // Not ours to remove unless it is still the file at `path`.
            remove_on_drop: false,
        };
        if held.still_at_path() {
            held.remove_on_drop = remove_on_drop;
            return Ok(held);
        }
        // Removed (and maybe re-created) by a supervisor that just stopped.
    }
    Err(LockError::Other(anyhow::anyhow!(
        "{} keeps being replaced while it is locked",
        path.display()
    )))
}

fn holders(pids: &[i32]) -> String {
    let me = std::process::id() as i32;
    let pids: Vec<i32> = pids.iter().copied().filter(|&p| p != me).collect();
    if pids.is_empty() {
        "a process this supervisor cannot see".into()
    } else {
        pids.iter()
            .map(|&pid| procfs::describe(pid))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
