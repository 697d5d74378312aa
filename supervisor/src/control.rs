//! The control socket between the CLI (`upgrade`, `status`, `stop`, `reexec`) and
//! the daemon, both halves: a unix stream socket at `<runtime_dir>/<service>.sock`,
//! mode 0600, one JSON request line per connection, JSON event lines back (the
//! wire format is in `docs/control-protocol.md`).
//!
//! The server half only translates: a request becomes a [`Command`] for the
//! daemon's event loop, which owns everything that changes state, and the
//! command's outcome becomes events.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    error::{EXIT_BAD_INPUT, EXIT_FAILED, InputError, exit_code},
    status::Status,
    upgrade::{Progress, Shared},
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Re-read the config at `config` and build a new generation; answer when it
    /// serves, or with `wait = "drained"` once the older generations are gone too.
    Upgrade {
        config: PathBuf,
        #[serde(default)]
        wait: UpgradeWait,
    },
    Status,
    Stop,
    /// Replace the supervisor process image with `binary`, keeping everything.
    Reexec {
        binary: PathBuf,
    },
}

/// When an upgrade request is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UpgradeWait {
    /// As soon as the new generation serves (older ones may still drain).
    #[default]
    Serving,
    /// Once every older generation has drained and is gone.
    Drained,
}

/// What a successful upgrade reports.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub generation: u32,
    /// Older generations still draining when the answer was sent.
    pub draining: Vec<u32>,
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
        status: Box<Status>,
    },
    /// The final line: success. For an upgrade, the older generations that are
    /// still draining.
    Done {
        message: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        draining: Vec<u32>,
    },
    /// The final line: failure, with the exit code the CLI should use.
    Error {
        exit_code: i32,
        message: String,
    },
}

/// What the server half asks of the daemon's event loop.
pub enum Command {
    Stop,
    /// Upgrade from the config at `config`; phases go to `progress`, the outcome
    /// to `done` (when the new generation serves, or per `wait`).
    Upgrade {
        config: PathBuf,
        wait: UpgradeWait,
        progress: Progress,
        done: oneshot::Sender<Result<Upgraded>>,
    },
    /// Exec `binary` in place; the sender hears why if that did not happen.
    Reexec {
        binary: PathBuf,
        refused: oneshot::Sender<String>,
    },
}

// ---- server half ----

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

async fn read_request(stream: &mut BufReader<UnixStream>) -> Result<Request> {
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    serde_json::from_str(&line).context("malformed control request")
}

async fn send(stream: &mut BufReader<UnixStream>, event: &Event) -> Result<()> {
    let mut line = serde_json::to_string(event)?;
    line.push('\n');
    stream.get_mut().write_all(line.as_bytes()).await?;
    Ok(())
}

/// Answers one connection: reads its request, has the event loop carry it out,
/// and writes the events back.
pub async fn serve_connection(
    shared: &Shared,
    stream: UnixStream,
    commands: mpsc::UnboundedSender<Command>,
) -> Result<()> {
    let mut stream = BufReader::new(stream);
    let request = match read_request(&mut stream).await {
        Ok(request) => request,
        Err(e) => {
            let message = format!("{e:#}");
            let event = Event::Error {
                exit_code: EXIT_BAD_INPUT,
                message,
            };
            return send(&mut stream, &event).await;
        }
    };
    let gone = || anyhow::anyhow!("the supervisor is stopping");
    match request {
        Request::Status => {
            let status = crate::status::collect(&shared.lock().unwrap());
            let event = Event::Status {
                status: Box::new(status),
            };
            send(&mut stream, &event).await?;
        }
        Request::Stop => {
            commands.send(Command::Stop).map_err(|_| gone())?;
            let event = Event::Done {
                message: "stopping: draining all generations".into(),
                draining: Vec::new(),
            };
            send(&mut stream, &event).await?;
        }
        Request::Reexec { binary } => {
            let (refused, why) = oneshot::channel();
            let event = Event::Phase {
                at_ms: 0,
                text: format!("re-executing {}", binary.display()),
            };
            send(&mut stream, &event).await?;
            commands
                .send(Command::Reexec { binary, refused })
                .map_err(|_| gone())?;
            // On success this process image is gone and the connection closes
            // with it; an answer here means the exec did not happen.
            if let Ok(message) = why.await {
                // Nothing changed (the handoff was undone): a refusal.
                let event = Event::Error {
                    exit_code: EXIT_BAD_INPUT,
                    message,
                };
                send(&mut stream, &event).await?;
            }
        }
        Request::Upgrade { config, wait } => {
            let (phases_tx, mut phases) = mpsc::unbounded_channel();
            let (done, outcome) = oneshot::channel();
            commands
                .send(Command::Upgrade {
                    config,
                    wait,
                    progress: Progress::new(Some(phases_tx)),
                    done,
                })
                .map_err(|_| gone())?;
            // Phases until the outcome. The drains an upgrade leaves behind keep
            // reporting to the same progress after that; they go to the log only.
            tokio::pin!(outcome);
            let outcome = loop {
                tokio::select! {
                    biased;
                    Some((at_ms, text)) = phases.recv() => {
                        // A CLI that went away does not stop the upgrade.
                        let _ = send(&mut stream, &Event::Phase { at_ms, text }).await;
                    }
                    outcome = &mut outcome => break outcome,
                }
            };
            while let Ok((at_ms, text)) = phases.try_recv() {
                let _ = send(&mut stream, &Event::Phase { at_ms, text }).await;
            }
            drop(phases);
            let event = match outcome {
                Ok(Ok(upgraded)) => Event::Done {
                    message: match upgraded.draining.len() {
                        0 => format!("generation {} serves", upgraded.generation),
                        n => format!(
                            "generation {} serves; {n} older generation{} still draining",
                            upgraded.generation,
                            if n == 1 { "" } else { "s" }
                        ),
                    },
                    draining: upgraded.draining,
                },
                Ok(Err(e)) => Event::Error {
                    exit_code: exit_code(&e),
                    message: format!("{e:#}"),
                },
                Err(_) => Event::Error {
                    exit_code: EXIT_FAILED,
                    message: "the supervisor stopped before the upgrade finished".into(),
                },
            };
            send(&mut stream, &event).await?;
        }
    }
    Ok(())
}

// ---- client half ----

/// Sends `request` and calls `on_event` for every event until the connection
/// closes.
pub async fn call(socket: &Path, request: &Request, mut on_event: impl FnMut(Event)) -> Result<()> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        InputError::new(format!(
            "cannot reach the supervisor at {} ({e}); is `supervisor run` running with this config?",
            socket.display()
        ))
    })?;
    // Only a daemon of root's or ours is believed, and only one that will answer us.
    crate::trust::check_daemon(stream.peer_cred()?.uid(), socket)?;
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

/// How long the CLI waits for the daemon's answer to a status request.
pub const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One `status` request, bounded by [`STATUS_TIMEOUT`].
pub async fn fetch_status(socket: &Path) -> Result<Status> {
    let mut status = None;
    let call = call(socket, &Request::Status, |event| {
        if let Event::Status { status: value } = event {
            status = Some(*value);
        }
    });
    match tokio::time::timeout(STATUS_TIMEOUT, call).await {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the supervisor did not answer within {STATUS_TIMEOUT:?}"),
    }
    status.ok_or_else(|| anyhow::anyhow!("no status from the supervisor"))
}
