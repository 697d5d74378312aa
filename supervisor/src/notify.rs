//! The `NOTIFY_SOCKET` the supervisor owns: workers send `READY=1` (and `STATUS=`,
//! `STOPPING=1`) to it with the sd_notify protocol.
//!
//! It is a unix datagram socket at a path, `<runtime_dir>/<service>.notify`, as
//! systemd's is, so every client library works (libsystemd, the `sd-notify`
//! crate, Python's and Go's, `systemd-notify`: several of them cannot reach an
//! abstract name). The file is mode 0666 (a worker running as `service.user`
//! must be able to send to it; the runtime directory is searchable by all and
//! writable by root only); access is decided per message instead: each message
//! is attributed by the sender's pid from `SCM_CREDENTIALS`, which the kernel
//! fills in and the sender cannot forge. A message from a current worker, or
//! from one of its descendants (a wrapper script's `systemd-notify --ready`,
//! found by walking the parent pids in `/proc`), counts for that worker; one
//! from anybody else is dropped.
//!
//! `systemd-notify` waits after its message until the receiver has consumed a
//! `BARRIER=1` message carrying a pipe fd (which is closed here unread), so it
//! is still alive, and its parent chain readable, when its `READY=1` is routed.
//!
//! A worker may send as much as it likes, as fast as it likes: what the
//! supervisor keeps of it is fixed. Messages are not queued: each is merged at
//! once into its worker's [`NotifyState`] (`READY=1` and `STOPPING=1` latch, the
//! latest `STATUS=` replaces the one before, cut to [`MAX_STATUS`] bytes, in a
//! buffer that is reused), and the worker's slot reads that state when it gets
//! to it. A worker that sends more than [`FLOOD_MESSAGES`] messages within
//! [`FLOOD_WINDOW`] is logged, at most twice per window.
use std::{
    collections::HashMap,
    fmt,
    io::IoSliceMut,
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::UnixDatagram,
    },
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use tokio::{io::unix::AsyncFd, sync::watch};

/// The longest notify message; a longer datagram is rejected (the kernel cuts it
/// to this size and says so with `MSG_TRUNC`).
pub const MAX_MESSAGE: usize = 4096;
/// The longest `STATUS=` text kept, in bytes; longer text is cut at a character
/// boundary.
pub const MAX_STATUS: usize = 1024;
/// The window over which a worker's messages are counted for the flood warning.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);
/// More messages than this from one worker within [`FLOOD_WINDOW`] are logged as
/// a flood (they are still read, and cost no memory).
pub const FLOOD_MESSAGES: u64 = 1000;

/// One notify message, split into its `KEY=VALUE` lines (what other parts of the
/// supervisor, e.g. the readiness probes, deliver on a worker's behalf).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyMessage {
    pub ready: bool,
    pub stopping: bool,
    pub status: Option<String>,
}

impl NotifyMessage {
    /// Parses one datagram; see [`Notice::parse`].
    pub fn parse(bytes: &[u8]) -> Result<NotifyMessage, NotifyError> {
        let notice = Notice::parse(bytes)?;
        Ok(NotifyMessage {
            ready: notice.ready,
            stopping: notice.stopping,
            status: notice.status.map(|raw| {
                let mut text = String::new();
                sanitize_status(raw, &mut text);
                text
            }),
        })
    }
}

/// A parsed notify message that borrows the datagram (no allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notice<'a> {
    pub ready: bool,
    pub stopping: bool,
    /// The last `STATUS=` line's text as sent (see [`sanitize_status`]).
    pub status: Option<&'a str>,
}

/// Why a datagram on the notify socket was not accepted as a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyError {
    Empty,
    /// Longer than [`MAX_MESSAGE`] (only the first `MAX_MESSAGE` bytes were read).
    TooLong,
    /// A NUL byte at this offset (sd_notify messages are text).
    Nul(usize),
    /// Not UTF-8 from this offset on.
    NotUtf8(usize),
    /// It carried ancillary data besides the credentials (file descriptors, say),
    /// which the supervisor never accepts.
    AncillaryData,
}

impl fmt::Display for NotifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyError::Empty => write!(f, "empty notify message"),
            NotifyError::TooLong => {
                write!(f, "notify message longer than {MAX_MESSAGE} bytes")
            }
            NotifyError::Nul(at) => write!(f, "notify message with a NUL byte at offset {at}"),
            NotifyError::NotUtf8(at) => {
                write!(f, "notify message that is not UTF-8 (from offset {at})")
            }
            NotifyError::AncillaryData => write!(
                f,
                "notify message with ancillary data besides credentials (e.g. file descriptors)"
            ),
        }
    }
}

impl std::error::Error for NotifyError {}

impl<'a> Notice<'a> {
    /// Parses one datagram of newline-separated `KEY=VALUE` lines (sd_notify(3)).
    /// `READY=1`, `STOPPING=1` and `STATUS=...` count; other lines are ignored.
    /// Rejected: an empty datagram, a NUL byte, text that is not UTF-8 (as
    /// systemd does). Length is the reader's business ([`MAX_MESSAGE`]).
    pub fn parse(bytes: &'a [u8]) -> Result<Notice<'a>, NotifyError> {
        if bytes.is_empty() {
            return Err(NotifyError::Empty);
        }
        if let Some(at) = bytes.iter().position(|&b| b == 0) {
            return Err(NotifyError::Nul(at));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| NotifyError::NotUtf8(e.valid_up_to()))?;
        let mut notice = Notice::default();
        for line in text.split('\n') {
            match line.split_once('=') {
                Some(("READY", "1")) => notice.ready = true,
                Some(("STOPPING", "1")) => notice.stopping = true,
                Some(("STATUS", status)) => notice.status = Some(status),
                _ => {}
            }
        }
        Ok(notice)
    }
}

/// Writes the `STATUS=` text a worker sent into `out` as `supervisor status`
/// will show it: control characters (a terminal escape sequence, say) become
/// U+FFFD, and the text is cut at a character boundary to at most
/// [`MAX_STATUS`] bytes. `out` is cleared first and never grows past
/// `MAX_STATUS`, so a reused buffer is never reallocated.
pub fn sanitize_status(raw: &str, out: &mut String) {
    out.clear();
    out.extend(sanitized(raw));
}

/// The characters [`sanitize_status`] keeps of `raw`.
fn sanitized(raw: &str) -> impl Iterator<Item = char> + '_ {
    let mut len = 0;
    raw.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .take_while(move |c| {
            len += c.len_utf8();
            len <= MAX_STATUS
        })
}

/// What a worker has said so far: the merge of all its messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyState {
    /// It sent `READY=1` (once is enough).
    pub ready: bool,
    /// It sent `STOPPING=1`.
    pub stopping: bool,
    /// Its latest `STATUS=` text (see [`sanitize_status`]).
    pub status: Option<String>,
}

impl NotifyState {
    /// Merges one message in. Returns whether anything changed.
    fn merge(&mut self, ready: bool, stopping: bool, status: Option<&str>) -> bool {
        let mut changed = false;
        if ready && !self.ready {
            self.ready = true;
            changed = true;
        }
        if stopping && !self.stopping {
            self.stopping = true;
            changed = true;
        }
        if let Some(raw) = status {
            match &mut self.status {
                // Rewritten in place, only if it differs: no allocation.
                Some(text) => {
                    if !text.chars().eq(sanitized(raw)) {
                        sanitize_status(raw, text);
                        changed = true;
                    }
                }
                None => {
                    let mut text = String::with_capacity(MAX_STATUS);
                    sanitize_status(raw, &mut text);
                    self.status = Some(text);
                    changed = true;
                }
            }
        }
        changed
    }
}

/// The receiving end of one worker's messages (see [`Registry::register`]).
pub struct Inbox {
    state: watch::Receiver<NotifyState>,
}

impl Inbox {
    /// Waits until the worker's state changed since the last call, and returns it.
    /// Cancel-safe. Pends forever once the worker is unregistered.
    pub async fn changed(&mut self) -> NotifyState {
        if self.state.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.state.borrow_and_update().clone()
    }
}

/// One registered worker: where its messages go, and how many it sent lately.
struct Route {
    state: watch::Sender<NotifyState>,
    window_start: Instant,
    received: u64,
    rejected: u64,
}

impl Route {
    /// Counts one message; logs (at most twice per window) a flood or rejections.
    fn count(&mut self, pid: i32, rejected: Option<NotifyError>) {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= FLOOD_WINDOW {
            if self.received > FLOOD_MESSAGES {
                tracing::warn!(
                    "worker pid {pid}: {} notify messages in the last {}s ({} rejected); only its latest status is kept",
                    self.received,
                    now.duration_since(self.window_start).as_secs(),
                    self.rejected
                );
            } else if self.rejected > 1 {
                tracing::warn!(
                    "worker pid {pid}: {} notify messages rejected in the last {}s",
                    self.rejected,
                    now.duration_since(self.window_start).as_secs()
                );
            }
            self.window_start = now;
            self.received = 0;
            self.rejected = 0;
        }
        self.received += 1;
        if self.received == FLOOD_MESSAGES + 1 {
            tracing::warn!(
                "worker pid {pid}: more than {FLOOD_MESSAGES} notify messages within {}s; \
                 reading on, keeping only its latest status",
                FLOOD_WINDOW.as_secs()
            );
        }
        if let Some(error) = rejected {
            self.rejected += 1;
            if self.rejected == 1 {
                tracing::warn!("worker pid {pid}: {error}: ignored");
            }
        }
    }
}

/// Which worker process gets which messages.
#[derive(Clone, Default)]
pub struct Registry {
    routes: Arc<Mutex<HashMap<i32, Route>>>,
}

impl Registry {
    pub fn register(&self, pid: i32) -> Inbox {
        let (state, receiver) = watch::channel(NotifyState::default());
        let route = Route {
            state,
            window_start: Instant::now(),
            received: 0,
            rejected: 0,
        };
        self.routes.lock().unwrap().insert(pid, route);
        Inbox { state: receiver }
    }

    pub fn unregister(&self, pid: i32) {
        self.routes.lock().unwrap().remove(&pid);
    }

    /// Delivers a message on a worker's behalf (e.g. a readiness probe's answer).
    pub(crate) fn deliver(&self, pid: i32, message: NotifyMessage) {
        let mut routes = self.routes.lock().unwrap();
        match routes.get_mut(&pid) {
            Some(route) => {
                route.state.send_if_modified(|state| {
                    state.merge(message.ready, message.stopping, message.status.as_deref())
                });
            }
            None => {
                tracing::debug!("notify message from pid {pid}, which is not a worker: ignored")
            }
        }
    }

    /// Delivers what a datagram from `pid` said, or counts its rejection.
    fn receive(&self, pid: i32, parsed: Result<Notice<'_>, NotifyError>) {
        let mut routes = self.routes.lock().unwrap();
        let Some(worker) = worker_of(pid, |p| routes.contains_key(&p)) else {
            tracing::debug!(
                "notify message from pid {pid}, which is neither a worker nor a descendant of one: ignored"
            );
            return;
        };
        let route = routes.get_mut(&worker).expect("checked by worker_of");
        route.count(pid, parsed.err());
        if let Ok(notice) = parsed {
            route.state.send_if_modified(|state| {
                state.merge(notice.ready, notice.stopping, notice.status)
            });
        }
    }
}

/// Parent links followed at most from a sender up to its worker.
const MAX_ANCESTRY: usize = 64;

/// The worker `pid` is, or descends from (`is_worker` says which pids are
/// workers), by the parent pids in `/proc/PID/stat`.
fn worker_of(pid: i32, is_worker: impl Fn(i32) -> bool) -> Option<i32> {
    let mut current = pid;
    for _ in 0..MAX_ANCESTRY {
        if is_worker(current) {
            return Some(current);
        }
        if current <= 1 {
            return None;
        }
        current = crate::procfs::parent_pid(current)?;
    }
    None
}

pub struct NotifySocket {
    /// The value for the workers' `NOTIFY_SOCKET`.
    pub env_value: String,
    socket: AsyncFd<UnixDatagram>,
}

impl NotifySocket {
    /// Binds `path` (`Config::notify_socket`, inside the runtime directory that
    /// start-up checked: owned by root, writable by nobody else). A socket file
    /// left there by a supervisor of this service that died is removed first;
    /// anything else at the path is refused.
    pub fn bind(path: &Path) -> Result<NotifySocket> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
                .with_context(|| format!("removing the stale notify socket {}", path.display()))?,
            Ok(_) => anyhow::bail!(
                "{} exists and is not a socket; it is not ours to remove",
                path.display()
            ),
            Err(_) => {}
        }
        let socket = UnixDatagram::bind(path)
            .with_context(|| format!("binding the notify socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("chmod 0666 {}", path.display()))?;
        setsockopt(&socket, sockopt::PassCred, &true)
            .context("SO_PASSCRED on the notify socket")?;
        socket.set_nonblocking(true)?;
        Ok(NotifySocket {
            env_value: path.display().to_string(),
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

    /// Reads messages forever and routes them to workers by sender pid. One
    /// fixed buffer; nothing is allocated per message.
    pub async fn serve(self, registry: Registry) {
        let mut buffer = vec![0u8; MAX_MESSAGE];
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
                // Room for the credentials only: file descriptors sent along are
                // never installed here (the kernel closes them, MSG_CTRUNC).
                let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
                // (`systemd-notify`'s `BARRIER=1` carries a pipe fd: closing it,
                // which the kernel does here, is the answer it waits for.)
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
                Ok((msg.bytes, msg.flags, pid))
            });
            match received {
                Ok(Ok((len, flags, Some(pid)))) => {
                    let parsed = if flags.contains(MsgFlags::MSG_TRUNC) {
                        Err(NotifyError::TooLong)
                    } else if flags.contains(MsgFlags::MSG_CTRUNC) && &buffer[..len] == b"BARRIER=1"
                    {
                        continue;
                    } else if flags.contains(MsgFlags::MSG_CTRUNC) {
                        Err(NotifyError::AncillaryData)
                    } else {
                        Notice::parse(&buffer[..len])
                    };
                    registry.receive(pid, parsed);
                }
                Ok(Ok((_, _, None))) => {
                    tracing::debug!("notify message without credentials: ignored")
                }
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
        let m = NotifyMessage::parse(b"READY=1\nSTATUS=serving 3 clients\n").unwrap();
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("serving 3 clients"));
        assert!(!NotifyMessage::parse(b"READY=0").unwrap().ready);
        // The last STATUS= line wins; unknown lines are ignored.
        let m = NotifyMessage::parse(b"STATUS=a\nWHATEVER=1\nSTATUS=b\nSTOPPING=1").unwrap();
        assert_eq!(m.status.as_deref(), Some("b"));
        assert!(m.stopping && !m.ready);
    }

    #[test]
    fn rejects_what_is_not_a_notify_message() {
        assert_eq!(NotifyMessage::parse(b""), Err(NotifyError::Empty));
        assert_eq!(
            NotifyMessage::parse(b"READY=1\0STATUS=x"),
            Err(NotifyError::Nul(7))
        );
        assert_eq!(
            NotifyMessage::parse(b"STATUS=\xff"),
            Err(NotifyError::NotUtf8(7))
        );
        for error in [
            NotifyError::Empty,
            NotifyError::TooLong,
            NotifyError::Nul(3),
            NotifyError::NotUtf8(3),
            NotifyError::AncillaryData,
        ] {
            assert!(error.to_string().starts_with("notify message") || error == NotifyError::Empty);
        }
    }

    #[test]
    fn status_is_cut_and_has_no_control_characters() {
        let long = "é".repeat(MAX_STATUS);
        let m = NotifyMessage::parse(format!("STATUS={long}").as_bytes()).unwrap();
        let status = m.status.unwrap();
        assert_eq!(status.len(), MAX_STATUS);
        assert!(long.starts_with(&status));
        let m = NotifyMessage::parse(b"STATUS=red \x1b[31mtext\x07\r").unwrap();
        assert_eq!(
            m.status.as_deref(),
            Some("red \u{fffd}[31mtext\u{fffd}\u{fffd}")
        );
    }

    /// A worker that sends a hundred thousand messages costs one state, not a queue: the
    /// state is the latest status and the latched READY.
    #[tokio::test]
    async fn a_flood_is_merged_not_queued() {
        let registry = Registry::default();
        let mut inbox = registry.register(42);
        registry.receive(42, Notice::parse(b"READY=1"));
        let pad = "x".repeat(4000);
        for i in 0..100_000 {
            let text = format!("STATUS=flood {i} {pad}");
            registry.receive(42, Notice::parse(text.as_bytes()));
        }
        registry.receive(42, Notice::parse(b"STATUS=done"));
        registry.receive(42, Notice::parse(b"STATUS=\xff"));
        let state = inbox.changed().await;
        assert!(state.ready);
        assert_eq!(state.status.as_deref(), Some("done"));
        {
            let routes = registry.routes.lock().unwrap();
            let route = &routes[&42];
            let capacity = route.state.borrow().status.as_ref().unwrap().capacity();
            assert!(
                (MAX_STATUS..2 * MAX_STATUS).contains(&capacity),
                "{capacity}"
            );
        }
        // Nothing more is pending: the next wait pends until a new message.
        let pending = tokio::time::timeout(Duration::from_millis(10), inbox.changed()).await;
        assert!(
            pending.is_err(),
            "no queue of old messages behind the state"
        );
        registry.unregister(42);
        registry.receive(42, Notice::parse(b"READY=1"));
    }

    /// A message from a worker's descendant counts for the worker; from anybody
    /// else (here the test process, whose ancestors are no workers) it does not.
    #[test]
    fn descendants_count_for_their_worker() {
        let me = std::process::id() as i32;
        let parent = crate::procfs::parent_pid(me).unwrap();
        assert_eq!(worker_of(me, |p| p == me), Some(me));
        assert_eq!(worker_of(me, |p| p == parent), Some(parent));
        assert_eq!(worker_of(me, |p| p == -5), None);
    }

    /// Generated datagrams (`fuzz`; `PROPTEST_CASES=N` for a longer run): the
    /// parser never panics, every rejection says what is wrong, and what is kept
    /// is bounded and printable.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        /// Lines that look like sd_notify, with now and then a NUL, a control
        /// character or a byte that is not UTF-8.
        fn notify_like() -> impl Strategy<Value = Vec<u8>> {
            let key = prop_oneof![
                Just(b"READY".to_vec()),
                Just(b"STATUS".to_vec()),
                Just(b"STOPPING".to_vec()),
                Just(b"WATCHDOG".to_vec()),
                proptest::collection::vec(b'A'..=b'Z', 0..8),
            ];
            let value = proptest::collection::vec(any::<u8>(), 0..64);
            let line = (key, any::<bool>(), value).prop_map(|(k, eq, v)| {
                let mut line = k;
                if eq {
                    line.push(b'=');
                }
                line.extend(v);
                line
            });
            proptest::collection::vec(line, 0..8).prop_map(|lines| lines.join(&b'\n'))
        }

        fn check(bytes: &[u8]) {
            match NotifyMessage::parse(bytes) {
                Ok(message) => {
                    assert!(std::str::from_utf8(bytes).is_ok());
                    if let Some(status) = &message.status {
                        assert!(status.len() <= MAX_STATUS);
                        assert!(!status.chars().any(char::is_control), "{status:?}");
                    }
                    let mut state = NotifyState::default();
                    let notice = Notice::parse(bytes).unwrap();
                    state.merge(notice.ready, notice.stopping, notice.status);
                    assert_eq!(state.status, message.status);
                    assert_eq!(state.ready, message.ready);
                }
                Err(error) => {
                    let text = error.to_string();
                    assert!(text.contains("notify message"), "{text}");
                    match error {
                        NotifyError::Empty => assert!(bytes.is_empty()),
                        NotifyError::Nul(at) => assert_eq!(bytes[at], 0),
                        NotifyError::NotUtf8(at) => {
                            assert!(std::str::from_utf8(&bytes[..at]).is_ok());
                            assert!(std::str::from_utf8(bytes).is_err());
                        }
                        NotifyError::TooLong | NotifyError::AncillaryData => {
                            panic!("the parser itself never says {error:?}")
                        }
                    }
                }
            }
        }

        proptest! {
            #[test]
            fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..=MAX_MESSAGE)) {
                check(&bytes);
            }

            #[test]
            fn notify_like_lines(bytes in notify_like()) {
                check(&bytes);
            }

            #[test]
            fn long_status_text(text in proptest::collection::vec(any::<char>(), 0..3000)) {
                let text: String = text.into_iter().collect();
                let message = format!("STATUS={text}\nREADY=1");
                if message.len() <= MAX_MESSAGE && !text.contains(['\0', '\n']) {
                    let parsed = NotifyMessage::parse(message.as_bytes()).unwrap();
                    prop_assert!(parsed.ready);
                    let status = parsed.status.unwrap();
                    prop_assert!(status.len() <= MAX_STATUS);
                    // What is kept is a prefix of the text, control characters replaced.
                    let replaced: String = text
                        .chars()
                        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                        .collect();
                    prop_assert!(replaced.starts_with(&status));
                }
            }
        }
    }
}
