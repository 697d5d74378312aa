//! The control socket between the CLI (`upgrade`, `status`, `stop`, `reexec`) and
//! the daemon, both halves: a unix stream socket at `<runtime_dir>/<service>.sock`,
//! mode 0600, one JSON request line per connection, JSON event lines back (the
//! wire format is in `docs/control-protocol.md`).
//!
//! The server half only translates: a request becomes a [`Command`] for the
//! daemon's event loop, which owns everything that changes state, and the
//! command's outcome becomes events.
//!
//! Whatever a client does, the server half holds a bounded amount for it: at
//! most [`MAX_CONNECTIONS`] connections at once ([`Connections`]), a request line
//! of at most [`MAX_REQUEST`] bytes, sent within [`REQUEST_TIMEOUT`], and answers
//! each written within [`WRITE_TIMEOUT`].
use std::{
    collections::VecDeque,
    fmt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
        BufReader,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn line_of(bytes: &[u8]) -> Result<Vec<u8>, RequestError> {
        read_request_line(&mut BufReader::new(bytes)).await
    }

    #[tokio::test]
    async fn a_request_line_is_bounded() {
        assert_eq!(
            line_of(b"{\"op\":\"status\"}\nmore").await.unwrap(),
            b"{\"op\":\"status\"}"
        );
        // Without a newline the request is what came before the end.
        assert_eq!(
            line_of(b"{\"op\":\"stop\"}").await.unwrap(),
            b"{\"op\":\"stop\"}"
        );
        assert!(matches!(line_of(b"").await, Err(RequestError::Closed)));
        let exactly = vec![b' '; MAX_REQUEST];
        assert_eq!(
            line_of(&[&exactly[..], b"\n"].concat())
                .await
                .unwrap()
                .len(),
            MAX_REQUEST
        );
        let over = vec![b'x'; 10 * MAX_REQUEST];
        let error = line_of(&over).await.unwrap_err();
        assert!(matches!(error, RequestError::TooLong));
        assert!(error.to_string().contains("65536"), "{error}");
    }

    #[test]
    fn decodes_requests_and_says_what_is_wrong() {
        assert!(matches!(
            decode_request(br#"{"op":"status"}"#),
            Ok(Request::Status)
        ));
        assert!(matches!(
            decode_request(b"{\"op\":\"stop\"}\r"),
            Ok(Request::Stop)
        ));
        match decode_request(br#"{"op":"upgrade","config":"/etc/x.toml"}"#) {
            Ok(Request::Upgrade { config, .. }) => assert_eq!(config, Path::new("/etc/x.toml")),
            other => panic!("{other:?}"),
        }
        for (line, says) in [
            (&b""[..], "empty request line"),
            (b"  ", "empty request line"),
            (b"{\"op\":\"explode\"}", "unknown variant `explode`"),
            (b"{\"op\":\"upgrade\"}", "missing field `config`"),
            (b"[1,2", "malformed control request"),
            (b"\xff\xfe", "malformed control request"),
        ] {
            let error = decode_request(line).unwrap_err().to_string();
            assert!(error.starts_with("malformed control request: "), "{error}");
            assert!(error.contains(says), "{error}");
        }
    }

    /// A connection that sends nothing is closed after REQUEST_TIMEOUT (paused
    /// clock: no waiting) with a message that says so.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out() {
        let (client, server) = tokio::io::duplex(64);
        let (_evict, evicted) = oneshot::channel();
        let error = read_request(&mut BufReader::new(server), evicted)
            .await
            .unwrap_err();
        assert!(matches!(error, RequestError::Timeout));
        assert!(
            error.to_string().contains("no request within 10s"),
            "{error}"
        );
        drop(client);
    }

    /// Past the cap, a new connection takes the place of the oldest one that has
    /// not sent its request; when every connection is busy, it is refused.
    #[tokio::test]
    async fn connections_are_capped_evicting_the_oldest_idle_one() {
        let connections = Connections::new(3);
        let mut admitted: Vec<Admitted> = (0..3).map(|_| connections.admit().unwrap()).collect();
        assert_eq!(connections.counts(), (3, 3));
        // The fourth evicts the first; places stay at 3.
        let fourth = connections.admit().unwrap();
        assert_eq!(connections.counts(), (3, 3));
        let mut first = admitted.remove(0);
        assert!(
            first.evicted.try_recv().is_ok(),
            "the oldest idle one is evicted"
        );
        assert!(admitted[0].evicted.try_recv().is_err());
        drop(first); // the evicted one ends: its place was handed over
        assert_eq!(connections.counts(), (3, 3));
        // All three remaining get their requests: nobody can be evicted.
        for a in admitted.iter().chain([&fourth]) {
            a.place.busy();
        }
        assert_eq!(connections.counts(), (3, 0));
        assert!(
            connections.admit().is_err(),
            "every connection is busy: refused"
        );
        drop(fourth);
        assert_eq!(connections.counts(), (2, 0));
        let fifth = connections.admit().unwrap();
        assert_eq!(connections.counts(), (3, 1));
        drop(admitted);
        drop(fifth);
        assert_eq!(connections.counts(), (0, 0));
    }

    /// A burst of connections, none of which sends anything, with the tasks
    /// that serve them running only after the whole burst was admitted: places
    /// never exceed the cap and the newest connections hold them.
    #[tokio::test]
    async fn a_burst_keeps_the_newest() {
        let connections = Connections::new(8);
        let mut tasks = Vec::new();
        for i in 0..100 {
            let admitted = connections.admit().unwrap();
            assert!(connections.counts().0 <= 8);
            tasks.push(tokio::spawn(async move {
                let Admitted { place, evicted } = admitted;
                let (_client, server) = tokio::io::duplex(64);
                let outcome = tokio::time::timeout(
                    Duration::from_millis(50),
                    read_request(&mut BufReader::new(server), evicted),
                )
                .await;
                drop(place);
                (i, matches!(outcome, Ok(Err(RequestError::Evicted))))
            }));
        }
        for task in tasks {
            let (i, evicted) = task.await.unwrap();
            assert_eq!(evicted, i < 92, "connection {i}");
        }
        assert_eq!(connections.counts(), (0, 0));
    }

    #[test]
    fn rate_limited_log_counts_what_it_suppressed() {
        let mut log = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        log.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(log.allow(), Some(2));
    }

    /// Generated request lines (`fuzz`; `PROPTEST_CASES=N` for a longer run): the
    /// framing and the decoder never panic, and every rejection is a clear error.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        fn check_decode(line: &[u8]) {
            match decode_request(line) {
                Ok(request) => {
                    // Anything accepted is a request the daemon can name.
                    let again = serde_json::to_string(&request).unwrap();
                    assert!(again.contains("\"op\""), "{again}");
                }
                Err(error) => {
                    let text = error.to_string();
                    assert!(text.starts_with("malformed control request: "), "{text}");
                    assert!(text.len() > "malformed control request: ".len());
                }
            }
        }

        /// JSON-ish text made of the protocol's own pieces.
        fn request_like() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just(&b"{"[..]),
                Just(&b"}"[..]),
                Just(&b"\"op\""[..]),
                Just(&b":"[..]),
                Just(&b","[..]),
                Just(&b"\"upgrade\""[..]),
                Just(&b"\"status\""[..]),
                Just(&b"\"stop\""[..]),
                Just(&b"\"reexec\""[..]),
                Just(&b"\"config\""[..]),
                Just(&b"\"binary\""[..]),
                Just(&b"\"/etc/x.toml\""[..]),
                Just(&b"\"\\u0000\""[..]),
                Just(&b"null"[..]),
                Just(&b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["[..]),
                Just(&b"1e999999"[..]),
                Just(&b"\xff"[..]),
                Just(&b"\r"[..]),
                Just(&b" "[..]),
            ];
            proptest::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
        }

        proptest! {
            #[test]
            fn arbitrary_bytes(line in proptest::collection::vec(any::<u8>(), 0..512)) {
                check_decode(&line);
            }

            #[test]
            fn request_like_lines(line in request_like()) {
                check_decode(&line);
            }

            /// Framing: whatever the stream holds, at most MAX_REQUEST bytes come
            /// back, without the newline, or a TooLong / Closed error.
            #[test]
            fn framing(
                body in proptest::collection::vec(any::<u8>(), 0..256),
                filler in 0..(2 * MAX_REQUEST),
                newline in any::<bool>(),
            ) {
                let mut stream = body.clone();
                stream.resize(body.len() + filler, b'a');
                if newline {
                    stream.push(b'\n');
                }
                let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let result = runtime.block_on(read_request_line(&mut BufReader::new(&stream[..])));
                let first_line = stream.split(|&b| b == b'\n').next().unwrap();
                match result {
                    Ok(line) => {
                        prop_assert!(line.len() <= MAX_REQUEST);
                        prop_assert_eq!(&line[..], first_line);
                    }
                    Err(RequestError::TooLong) => prop_assert!(first_line.len() > MAX_REQUEST),
                    Err(RequestError::Closed) => prop_assert!(stream.is_empty()),
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                }
            }
        }
    }
}
