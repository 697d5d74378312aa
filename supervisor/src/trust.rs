//! What the supervisor trusts on the host, checked rather than assumed: that only
//! root (or the supervisor's own user) can change its runtime directory, that a
//! file it writes there is the file it created, and, on the CLI's side, that the
//! daemon answering on the control socket runs as root or as the caller.
use std::path::Path;

use crate::error::InputError;

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
