//! The daemon's half: accepting, bounding and answering connections.
use std::{
    collections::VecDeque,
    fmt,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
        BufReader,
    },
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    error::{EXIT_BAD_INPUT, EXIT_FAILED, exit_code},
    upgrade::{Progress, Shared},
};

use super::{Command, Event, Request};

#[cfg(test)]
mod tests;

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

/// The longest request line the daemon reads, in bytes (without the newline).
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a connection may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one event line may take to be written (to a client that does not read).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Why a connection's request was not read, or not understood.
#[derive(Debug)]
pub enum RequestError {
    /// More than [`MAX_REQUEST`] bytes without a newline.
    TooLong,
    /// No complete request within [`REQUEST_TIMEOUT`].
    Timeout,
    /// Closed to make room for a newer connection (see [`Connections`]).
    Evicted,
    /// The client closed the connection without sending anything.
    Closed,
    Io(std::io::Error),
    /// Not a request: what is wrong with it.
    Malformed(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::TooLong => write!(
                f,
                "control request longer than {MAX_REQUEST} bytes: a request is one JSON line"
            ),
            RequestError::Timeout => write!(
                f,
                "no request within {}s of connecting: closed",
                REQUEST_TIMEOUT.as_secs()
            ),
            RequestError::Evicted => write!(
                f,
                "no request yet, and {MAX_CONNECTIONS} control connections are open: closed to make room for a newer one"
            ),
            RequestError::Closed => write!(f, "the client closed the connection without a request"),
            RequestError::Io(e) => write!(f, "reading the control request: {e}"),
            RequestError::Malformed(why) => write!(f, "malformed control request: {why}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// Reads one request line: up to and without the first newline, or up to the end
/// of the stream if it closes without one. Never holds more than
/// [`MAX_REQUEST`] + 1 bytes of it.
pub async fn read_request_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<Vec<u8>, RequestError> {
    let mut line = Vec::new();
    let limit = MAX_REQUEST as u64 + 1;
    (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await
        .map_err(RequestError::Io)?;
    match line.last() {
        Some(b'\n') => {
            line.pop();
        }
        Some(_) if line.len() > MAX_REQUEST => return Err(RequestError::TooLong),
        Some(_) => {} // the stream ended without a newline: the request is what came
        None => return Err(RequestError::Closed),
    }
    Ok(line)
}

/// Decodes one request line (without its newline; a trailing `\r` is allowed).
pub fn decode_request(line: &[u8]) -> Result<Request, RequestError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::Malformed("empty request line".into()));
    }
    serde_json::from_slice(line).map_err(|e| RequestError::Malformed(e.to_string()))
}

/// Reads and decodes a connection's request, within [`REQUEST_TIMEOUT`], unless
/// `evicted` fires first.
pub async fn read_request<R: AsyncRead + Unpin>(
    stream: &mut BufReader<R>,
    evicted: oneshot::Receiver<()>,
) -> Result<Request, RequestError> {
    let read = tokio::time::timeout(REQUEST_TIMEOUT, read_request_line(stream));
    tokio::select! {
        read = read => match read {
            Ok(line) => decode_request(&line?),
            Err(_) => Err(RequestError::Timeout),
        },
        Ok(()) = evicted => Err(RequestError::Evicted),
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, event: &Event) -> Result<()> {
    let mut line = serde_json::to_string(event)?;
    line.push('\n');
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(line.as_bytes()))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the client read nothing for {}s: closed",
                WRITE_TIMEOUT.as_secs()
            )
        })??;
    Ok(())
}

/// The control connections being served: at most [`MAX_CONNECTIONS`] at once.
/// A connection beyond that takes the place of the oldest one that has not sent
/// its request yet (which is told so and closed); if every connection is busy
/// with a request, the new one is refused with an error event ([`refuse`]).
#[derive(Clone)]
pub struct Connections {
    max: usize,
    inner: Arc<Mutex<ConnectionsInner>>,
}

#[derive(Default)]
struct ConnectionsInner {
    /// Places taken (connections admitted and not yet ended, minus those whose
    /// place was handed to a newer connection).
    open: usize,
    /// Connections still waiting for their request line, oldest first: id, the
    /// sender that evicts it, and the flag that says its place was handed over.
    idle: VecDeque<(u64, oneshot::Sender<()>, Arc<AtomicBool>)>,
    next_id: u64,
}

/// A connection [`Connections::admit`] let in: its place, given back when it is
/// dropped, and the receiver that fires if a newer connection evicts it.
pub struct Admitted {
    place: Place,
    evicted: oneshot::Receiver<()>,
}

/// Every connection is busy with a request: answer with [`refuse`] and close.
#[derive(Debug)]
pub struct Refused;

struct Place {
    connections: Connections,
    id: u64,
    handed_over: Arc<AtomicBool>,
}

impl Place {
    /// The connection has its request: it can no longer be evicted.
    fn busy(&self) {
        let mut inner = self.connections.inner.lock().unwrap();
        inner.idle.retain(|(id, _, _)| *id != self.id);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut inner = self.connections.inner.lock().unwrap();
        inner.idle.retain(|(id, _, _)| *id != self.id);
        if !self.handed_over.load(Ordering::Relaxed) {
            inner.open -= 1;
        }
    }
}

impl Default for Connections {
    fn default() -> Self {
        Connections::new(MAX_CONNECTIONS)
    }
}

impl Connections {
    pub fn new(max: usize) -> Connections {
        Connections {
            max,
            inner: Arc::default(),
        }
    }

    /// Decides, without waiting, whether to serve a connection just accepted. It
    /// counts as waiting for its request from now on, so a newer one can evict it.
    pub fn admit(&self) -> Result<Admitted, Refused> {
        let mut inner = self.inner.lock().unwrap();
        if inner.open < self.max {
            inner.open += 1;
        } else {
            // Take the place of the oldest connection without a request.
            loop {
                let Some((_, evict, handed_over)) = inner.idle.pop_front() else {
                    return Err(Refused);
                };
                if evict.send(()).is_ok() {
                    handed_over.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        let handed_over = Arc::new(AtomicBool::new(false));
        inner.idle.push_back((id, evict, handed_over.clone()));
        Ok(Admitted {
            place: Place {
                connections: self.clone(),
                id,
                handed_over,
            },
            evicted,
        })
    }

    /// `(places taken, connections waiting for their request)`.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap();
        (inner.open, inner.idle.len())
    }
}

/// The answer to a connection refused by [`Connections::admit`], written without
/// waiting (a fresh socket's buffer has room for it) before it is closed.
pub fn refuse(stream: &UnixStream) {
    let event = Event::Error {
        exit_code: EXIT_BAD_INPUT,
        message: format!("{MAX_CONNECTIONS} control connections are busy with requests; try again"),
    };
    if let Ok(mut line) = serde_json::to_string(&event) {
        line.push('\n');
        let _ = stream.try_write(line.as_bytes());
    }
}

/// Logs a recurring error at most once per `every`, with how many were not logged.
pub struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; if so, also how many were suppressed since the last.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Answers one connection: reads its request, has the event loop carry it out,
/// and writes the events back. It holds its place among the [`Connections`]
/// until it ends (or is evicted while it waits for its request).
pub async fn serve_connection(
    shared: &Shared,
    stream: UnixStream,
    commands: mpsc::UnboundedSender<Command>,
    admitted: Admitted,
) -> Result<()> {
    let Admitted { place, evicted } = admitted;
    let mut stream = BufReader::new(stream);
    let request = read_request(&mut stream, evicted).await;
    place.busy();
    let request = match request {
        Ok(request) => request,
        Err(RequestError::Closed) => return Ok(()),
        Err(e) => {
            let event = Event::Error {
                exit_code: EXIT_BAD_INPUT,
                message: e.to_string(),
            };
            // The client may be gone, or may not read: nothing to report.
            let _ = send(stream.get_mut(), &event).await;
            return Ok(());
        }
    };
    let stream = stream.get_mut();
    let gone = || anyhow::anyhow!("the supervisor is stopping");
    match request {
        Request::Status => {
            let status = crate::status::collect(&shared.lock().unwrap());
            let event = Event::Status {
                status: Box::new(status),
            };
            send(stream, &event).await?;
        }
        Request::Stop => {
            commands.send(Command::Stop).map_err(|_| gone())?;
            let event = Event::Done {
                message: "stopping: draining all generations".into(),
                draining: Vec::new(),
            };
            send(stream, &event).await?;
        }
        Request::Reexec { binary } => {
            let (refused, why) = oneshot::channel();
            let event = Event::Phase {
                at_ms: 0,
                text: format!("re-executing {}", binary.display()),
            };
            send(stream, &event).await?;
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
                send(stream, &event).await?;
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
            // A CLI that went away (or stopped reading) does not stop the upgrade;
            // it is not written to again.
            let mut client_gone = false;
            tokio::pin!(outcome);
            let outcome = loop {
                tokio::select! {
                    biased;
                    Some((at_ms, text)) = phases.recv() => {
                        if !client_gone {
                            client_gone = send(stream, &Event::Phase { at_ms, text }).await.is_err();
                        }
                    }
                    outcome = &mut outcome => break outcome,
                }
            };
            while let Ok((at_ms, text)) = phases.try_recv() {
                if !client_gone {
                    client_gone = send(stream, &Event::Phase { at_ms, text }).await.is_err();
                }
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
            if !client_gone {
                send(stream, &event).await?;
            }
        }
    }
    Ok(())
}
