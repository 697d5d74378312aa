//! Readiness and status: the sending side of systemd's sd_notify protocol.
//!
//! The protocol is one unix datagram per message, sent to the socket named by
//! `NOTIFY_SOCKET`. A message is newline-separated `KEY=VALUE` lines:
//! `READY=1`, `STATUS=free text`, `STOPPING=1`, ...
//!
//! The receiver learns who sent a message from the kernel (`SCM_CREDENTIALS`),
//! not from its content, so messages must be sent by the worker process
//! itself: sending from a helper process would be ignored. Any thread of the
//! worker is fine; the credentials carry the process id.
//!
//! `NOTIFY_SOCKET` is either a filesystem path (`/run/...`) or a name in
//! Linux's abstract socket namespace, written with a leading `@` (the
//! supervisor uses those: they need no directory and vanish with the socket).

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::error::Error;

/// Sends `state` (one or more `KEY=VALUE` lines) to `NOTIFY_SOCKET`.
///
/// Does nothing and returns `Ok` when `NOTIFY_SOCKET` is unset, so a worker
/// can call it unconditionally and still run by hand.
pub fn notify(state: &str) -> Result<(), Error> {
    match std::env::var_os("NOTIFY_SOCKET") {
        None => Ok(()),
        Some(target) => notify_to(&target, state),
    }
}

/// `READY=1`: the worker has taken its sockets and serves. The supervisor
/// switches traffic to a generation when all its workers said this.
pub fn notify_ready() -> Result<(), Error> {
    notify("READY=1")
}

/// `STATUS=...`: a one-line human-readable status, shown by
/// `supervisor status` (and `systemctl status`). Newlines would start new
/// `KEY=VALUE` lines, so they are replaced by spaces.
pub fn notify_status(status: &str) -> Result<(), Error> {
    notify(&status_message(status))
}

fn status_message(status: &str) -> String {
    let mut message = String::with_capacity("STATUS=".len() + status.len());
    message.push_str("STATUS=");
    message.extend(status.chars().map(|c| if c == '\n' { ' ' } else { c }));
    message
}

/// `STOPPING=1`: the worker is draining and will exit on its own.
pub fn notify_stopping() -> Result<(), Error> {
    notify("STOPPING=1")
}

/// Sends `state` to the notify socket `target` (a `NOTIFY_SOCKET` value).
pub(crate) fn notify_to(target: &OsStr, state: &str) -> Result<(), Error> {
    let addr = notify_addr(target)?;
    let context = || {
        format!(
            "sending {state:?} to NOTIFY_SOCKET={}",
            target.to_string_lossy()
        )
    };
    // A fresh unbound socket per message: messages are rare (readiness,
    // occasional status), and holding no socket means nothing to share
    // between threads or to leak into children.
    let socket = UnixDatagram::unbound().map_err(|e| Error::io(context(), e))?;
    socket
        .send_to_addr(state.as_bytes(), &addr)
        .map_err(|e| Error::io(context(), e))?;
    Ok(())
}

/// Parses a `NOTIFY_SOCKET` value into a socket address.
fn notify_addr(target: &OsStr) -> Result<SocketAddr, Error> {
    let bytes = target.as_bytes();
    let invalid = |reason: &str| Error::InvalidEnv {
        var: "NOTIFY_SOCKET",
        value: target.to_string_lossy().into_owned(),
        reason: reason.to_owned(),
    };
    let result = match bytes.first() {
        // "@name" means the abstract name "\0name": the '@' stands for the
        // leading NUL byte, which cannot be written in an environment variable.
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(target),
        _ => {
            return Err(invalid(
                "not an absolute path or an abstract name starting with '@'",
            ));
        }
    };
    result.map_err(|e| invalid(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_an_abstract_name() {
        let name = format!("worker-sdk-test/{}/abstract", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        assert_eq!(recv(&receiver), "READY=1");
    }

    #[test]
    fn sends_to_a_path() {
        let dir = std::env::temp_dir().join(format!("worker-sdk-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "STATUS=serving\nSTOPPING=1").unwrap();
        assert_eq!(recv(&receiver), "STATUS=serving\nSTOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_targets_are_reported() {
        let err = notify_to(OsStr::new("relative/path"), "READY=1")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(r#"NOTIFY_SOCKET="relative/path": not an absolute path"#),
            "{err}"
        );
        let err = notify_to(OsStr::new("@worker-sdk-test/nobody-listens"), "READY=1")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                r#"sending "READY=1" to NOTIFY_SOCKET=@worker-sdk-test/nobody-listens: "#
            ),
            "{err}"
        );
    }

    #[test]
    fn status_is_one_line() {
        assert_eq!(status_message("a\nb"), "STATUS=a b");
    }

    #[test]
    fn unset_notify_socket_is_a_no_op() {
        // Reading the variable is safe even while other tests run; the test
        // harness never sets NOTIFY_SOCKET, so this exercises the no-op path
        // (unless the tests themselves run under systemd, where it is fine too).
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            notify_ready().unwrap();
            notify_status("multi\nline").unwrap();
        }
    }
}
