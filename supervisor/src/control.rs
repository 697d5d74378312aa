//! The control socket between the CLI (`upgrade`, `status`, `stop`) and the daemon:
//! a unix stream socket at `<runtime_dir>/<service>.sock`, mode 0600, one JSON
//! request line per connection, JSON event lines back.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::error::InputError;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Re-read the config at `config` and build a new generation.
    Upgrade {
        config: PathBuf,
    },
    Status,
    Stop,
    /// Replace the supervisor process image with `binary`, keeping everything.
    Reexec {
        binary: PathBuf,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// A phase of an upgrade, `at_ms` after the daemon received the request.
    Phase {
        at_ms: u64,
        text: String,
    },
    Status {
        status: serde_json::Value,
    },
    /// The final line: success.
    Done {
        message: String,
    },
    /// The final line: failure, with the exit code the CLI should use.
    Error {
        exit_code: i32,
        message: String,
    },
}

pub fn bind(path: &Path) -> Result<UnixListener> {
    // The caller holds the service lock: a socket file here is a dead daemon's.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    // Created with a umask that leaves it 0600 from the start, so there is no
    // window in which another user could connect.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old_umask);
    listener.with_context(|| format!("binding the control socket {}", path.display()))
}

/// Only root and the daemon's own user may control it.
pub fn peer_allowed(stream: &UnixStream) -> bool {
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

pub async fn read_request(stream: &mut BufReader<UnixStream>) -> Result<Request> {
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    serde_json::from_str(&line).context("malformed control request")
}

pub async fn send(stream: &mut BufReader<UnixStream>, event: &Event) -> Result<()> {
    let mut line = serde_json::to_string(event)?;
    line.push('\n');
    stream.get_mut().write_all(line.as_bytes()).await?;
    Ok(())
}

/// The CLI side: sends `request` and calls `on_event` for every event until the
/// connection closes.
pub async fn call(socket: &Path, request: &Request, mut on_event: impl FnMut(Event)) -> Result<()> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        InputError::new(format!(
            "cannot reach the supervisor at {} ({e}); is `supervisor run` running with this config?",
            socket.display()
        ))
    })?;
    let mut stream = BufReader::new(stream);
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.get_mut().write_all(line.as_bytes()).await?;
    let mut lines = stream.lines();
    while let Some(line) = lines.next_line().await? {
        on_event(serde_json::from_str(&line).with_context(|| format!("malformed reply {line:?}"))?);
    }
    Ok(())
}
