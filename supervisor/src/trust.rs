//! What the supervisor trusts on the host, checked rather than assumed: that only
//! root (or the supervisor's own user) can change its runtime directory, that a
//! file it writes there is the file it created, and, on the CLI's side, that the
//! daemon answering on the control socket runs as root or as the caller.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::error::InputError;

/// Users whose files and directories the supervisor may rely on: root and itself.
fn trusted(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

const GROUP_OR_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Creates the runtime directory if it is missing (mode 0755, whatever the umask)
/// and refuses one another user could change: one not owned by root or by us, one
/// that group or others may write, or one reached through a directory or symlink
/// another user controls. `key` names it in messages (`<file>: service.runtime_dir`).
///
/// Returns the directories it created, outermost first, for a failed start to
/// remove.
pub fn prepare_runtime_dir(dir: &Path, key: &str) -> Result<Vec<PathBuf>, InputError> {
    let refuse = |why: String| InputError::new(format!("{key}: {why}"));
    check_runtime_dir_ancestors(dir, key)?;
    let mut created = Vec::new();
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| fs::symlink_metadata(p).is_err())
        .collect();
    for path in missing.into_iter().rev() {
        let made = fs::DirBuilder::new()
            .mode(0o755)
            .create(path)
            .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o755)));
        if let Err(e) = made {
            remove_dirs(&created);
            return Err(refuse(format!("cannot create {}: {e}", path.display())));
        }
        created.push(path.to_path_buf());
    }
    let checked = fs::metadata(dir)
        .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))
        .and_then(|meta| check_runtime_dir(dir, &meta));
    if let Err(why) = checked {
        remove_dirs(&created);
        return Err(refuse(why));
    }
    Ok(created)
}

/// What [`prepare_runtime_dir`] refuses, checked without creating anything
/// (`supervisor check`): the same messages; a missing directory is fine when the
/// directories above it are trusted (`run` would create it).
pub fn check_runtime_dir_path(dir: &Path, key: &str) -> Result<(), InputError> {
    check_runtime_dir_ancestors(dir, key)?;
    match fs::metadata(dir) {
        Ok(meta) => {
            check_runtime_dir(dir, &meta).map_err(|why| InputError::new(format!("{key}: {why}")))
        }
        Err(_) => Ok(()),
    }
}

/// Everything on the way to `dir` must be trusted before anything is created below it.
fn check_runtime_dir_ancestors(dir: &Path, key: &str) -> Result<(), InputError> {
    let refuse = |why: String| InputError::new(format!("{key}: {why}"));
    let mut walked = PathBuf::new();
    for component in dir.components() {
        walked.push(component);
        let Ok(link) = fs::symlink_metadata(&walked) else {
            break;
        };
        if link.file_type().is_symlink() && !trusted(link.uid()) {
            return Err(refuse(format!(
                "{} is a symlink owned by uid {}, another user: they decide where it leads",
                walked.display(),
                link.uid()
            )));
        }
        if walked == dir {
            break;
        }
        let meta = fs::metadata(&walked)
            .map_err(|e| refuse(format!("cannot inspect {}: {e}", walked.display())))?;
        check_ancestor(&walked, &meta).map_err(refuse)?;
    }
    Ok(())
}

/// A directory above the runtime directory: owned by a trusted user, and if
/// others may write it, sticky (as `/tmp`), so they cannot rename what is in it.
fn check_ancestor(path: &Path, meta: &fs::Metadata) -> Result<(), String> {
    if !trusted(meta.uid()) {
        return Err(format!(
            "{} (on the way to the runtime directory) is owned by uid {}, another user",
            path.display(),
            meta.uid()
        ));
    }
    if meta.is_dir() && meta.mode() & GROUP_OR_OTHER_WRITE != 0 && meta.mode() & STICKY == 0 {
        return Err(format!(
            "{} (on the way to the runtime directory) is writable by other users (mode {:04o}) and not sticky: they could replace the runtime directory",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The runtime directory itself: a directory owned by a trusted user that nobody
/// else may write (no sticky-bit exception: another user's file in it could be a
/// symlink waiting for the handoff, or a socket pretending to be ours).
fn check_runtime_dir(dir: &Path, meta: &fs::Metadata) -> Result<(), String> {
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if !trusted(meta.uid()) {
        return Err(format!(
            "{} is owned by uid {}, not root or the supervisor's user: that user could replace the control socket or plant symlinks in it",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & GROUP_OR_OTHER_WRITE != 0 {
        return Err(format!(
            "{} is writable by other users (mode {:04o}): they could replace the control socket or plant symlinks in it; make it writable by its owner only (chmod 0755) or use another directory",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Refuses a runtime directory (or a directory above it) that `uid`/`gid`, a
/// worker's `service.user`, cannot search: it could not reach the notify
/// socket in it. A directory that does not exist yet is fine (it is created
/// 0755).
pub fn check_searchable_by(dir: &Path, uid: u32, gid: u32, key: &str) -> Result<(), InputError> {
    for ancestor in dir.ancestors() {
        let Ok(meta) = fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.mode();
        let searchable = if uid == 0 {
            true
        } else if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(InputError::new(format!(
                "{key}: {} (mode {:04o}, uid {}) is not searchable by service.user (uid {uid}), whose workers must reach the notify socket in {}; chmod o+x it or use another runtime_dir",
                ancestor.display(),
                mode & 0o7777,
                meta.uid(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Removes directories created by [`prepare_runtime_dir`], innermost first, while
/// they are empty.
pub fn remove_dirs(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        let _ = fs::remove_dir(dir);
    }
}

/// Writes `contents` to a new file at `path`, mode 0600, that this call created:
/// whatever was at `path` (a stale file, or a symlink planted there) is removed
/// first, never followed, and a file that appears meanwhile makes this fail
/// rather than be written through (`O_CREAT | O_EXCL | O_NOFOLLOW`).
pub fn write_new_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Opens an existing file for reading without following a symlink at `path`.
pub fn open_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The CLI's side of the control socket: the daemon at `socket` runs as `server`.
/// Refuses a server that is neither root nor the caller (anyone else could have
/// put a socket there), and, ahead of the daemon, a caller it would refuse: the
/// daemon answers only root and its own user.
pub fn check_daemon(server: u32, socket: &Path) -> Result<(), InputError> {
    let me = nix::unistd::geteuid().as_raw();
    if server != 0 && server != me {
        return Err(InputError::new(format!(
            "not trusting {}: the process listening there runs as uid {server}, not root or you (uid {me}); \
             is the runtime directory writable by other users?",
            socket.display()
        )));
    }
    if me != 0 && me != server {
        return Err(InputError::new(format!(
            "permission denied: uid {me} may not control this supervisor (it runs as uid {server}); run this as root"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_symlink_is_replaced_not_followed() {
        let dir = std::env::temp_dir().join(format!("trust-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, "precious").unwrap();
        let path = dir.join("handoff.json");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_new_private_file(&path, b"{}").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(open_no_follow(&path).is_ok());
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(open_no_follow(&path).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cli_trusts_root_and_itself_only() {
        let me = nix::unistd::geteuid().as_raw();
        let socket = Path::new("/run/supervisor/echo.sock");
        assert!(check_daemon(0, socket).is_ok() || me != 0);
        assert!(check_daemon(me, socket).is_ok());
        let other = if me == 65534 { 65533 } else { 65534 };
        let err = check_daemon(other, socket).unwrap_err().to_string();
        assert!(
            err.contains("uid 65534") || err.contains("uid 65533"),
            "{err}"
        );
        assert!(err.contains("/run/supervisor/echo.sock"), "{err}");
    }
}
