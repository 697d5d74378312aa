//! The `NOTIFY_SOCKET` the supervisor owns: workers send `READY=1` (and `STATUS=`,
//! `STOPPING=1`) to it with the sd_notify protocol.
//!
//! It is an abstract unix datagram socket (no file to clean up or to give the
//! workers' user permission on). Anyone in the network namespace could send to it,
//! so each message is attributed by the sender's pid from `SCM_CREDENTIALS`, which
//! the kernel fills in and the sender cannot forge; messages from pids that are
//! not current workers are dropped.
use std::{
    collections::HashMap,
    io::IoSliceMut,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use tokio::{io::unix::AsyncFd, sync::mpsc};

/// One notify message, split into its `KEY=VALUE` lines.
#[derive(Debug, Clone, Default)]
pub struct NotifyMessage {
    pub ready: bool,
    pub stopping: bool,
    pub status: Option<String>,
}

impl NotifyMessage {
    pub fn parse(text: &str) -> NotifyMessage {
        let mut message = NotifyMessage::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => message.ready = true,
                Some(("STOPPING", "1")) => message.stopping = true,
                Some(("STATUS", status)) => message.status = Some(status.to_string()),
                _ => {}
            }
        }
        message
    }
}

/// Which worker process gets which messages.
#[derive(Clone, Default)]
pub struct Registry {
    routes: Arc<Mutex<HashMap<i32, mpsc::UnboundedSender<NotifyMessage>>>>,
}

impl Registry {
    pub fn register(&self, pid: i32) -> mpsc::UnboundedReceiver<NotifyMessage> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().unwrap().insert(pid, tx);
        rx
    }

    pub fn unregister(&self, pid: i32) {
        self.routes.lock().unwrap().remove(&pid);
    }

    pub(crate) fn deliver(&self, pid: i32, message: NotifyMessage) {
        match self.routes.lock().unwrap().get(&pid) {
            Some(route) => {
                let _ = route.send(message);
            }
            None => {
                tracing::debug!("notify message from pid {pid}, which is not a worker: ignored")
            }
        }
    }
}

pub struct NotifySocket {
    /// The value for the workers' `NOTIFY_SOCKET`.
    pub env_value: String,
    socket: AsyncFd<UnixDatagram>,
}

impl NotifySocket {
    pub fn bind(service: &str) -> Result<NotifySocket> {
        let name = format!("supervisor/{service}/{}/notify", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = UnixDatagram::bind_addr(&address).context("binding the notify socket")?;
        setsockopt(&socket, sockopt::PassCred, &true)
            .context("SO_PASSCRED on the notify socket")?;
        socket.set_nonblocking(true)?;
        Ok(NotifySocket {
            env_value: format!("@{name}"),
            socket: crate::sys::register_async(socket)?,
        })
    }

    /// Takes over the notify socket a previous image of this process bound (re-exec).
    pub fn from_fd(fd: std::os::fd::OwnedFd, env_value: String) -> Result<NotifySocket> {
        let socket = UnixDatagram::from(fd);
        socket.set_nonblocking(true)?;
        Ok(NotifySocket {
            env_value,
            socket: crate::sys::register_async(socket)?,
        })
    }

    /// The socket's fd number (for a re-exec handoff).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.socket.get_ref())
    }

    /// Reads messages forever and routes them to workers by sender pid.
    pub async fn serve(self, registry: Registry) {
        let mut buffer = vec![0u8; 4096];
        loop {
            let mut guard = match self.socket.readable().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::error!("notify socket: {e}");
                    return;
                }
            };
            let received = guard.try_io(|socket| {
                let mut iov = [IoSliceMut::new(&mut buffer)];
                let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
                let msg = recvmsg::<()>(
                    std::os::fd::AsRawFd::as_raw_fd(socket.get_ref()),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let pid = msg.cmsgs().ok().and_then(|mut cmsgs| {
                    cmsgs.find_map(|c| match c {
                        ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid()),
                        _ => None,
                    })
                });
                Ok((msg.bytes, pid))
            });
            match received {
                Ok(Ok((len, Some(pid)))) => {
                    let text = String::from_utf8_lossy(&buffer[..len]);
                    registry.deliver(pid, NotifyMessage::parse(&text));
                }
                Ok(Ok((_, None))) => tracing::debug!("notify message without credentials: ignored"),
                Ok(Err(e)) => tracing::warn!("notify socket: {e}"),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sd_notify_lines() {
        let m = NotifyMessage::parse("READY=1\nSTATUS=serving 3 clients\n");
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("serving 3 clients"));
        assert!(!NotifyMessage::parse("READY=0").ready);
    }
}
