//! Draining: finishing what the kernel already queued, then exiting.
//!
//! When a new generation takes over, the supervisor's eBPF selector stops
//! sending new datagrams to the old sockets, but those sockets may still hold
//! datagrams that arrived just before the switch. If the old worker exited at
//! once they would be lost. So the supervisor sends a *drain signal*
//! (SIGTERM by default) and the worker:
//!
//! 1. notes the request in a flag (a signal handler can do little else
//!    safely; setting an `AtomicBool` is async-signal-safe);
//! 2. keeps reading, now with a short *read deadline*: every read that
//!    returns a datagram is served, and once the socket has gone the whole
//!    deadline without one (counted from its last datagram, so idle time
//!    before the request counts, and at least one read is made after it) it is
//!    idle — everything queued has been served;
//! 3. returns, so the worker can exit 0.
//!
//! The std helpers poll the flag between reads. While not draining, reads
//! time out every [`POLL_INTERVAL`] (100 ms) just to look at the flag; a busy
//! socket looks at it after every datagram. The signal also interrupts the
//! read of whichever thread the kernel delivers it to (reads with
//! `SO_RCVTIMEO` fail with `EINTR` even under `SA_RESTART`; see signal(7)), so
//! that thread starts draining at once and the others within the interval.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::AddAssign;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use libc::c_int;
use nix::sys::signal::Signal;

use crate::error::Error;

/// How often an idle, not-yet-draining reader wakes up to check the drain flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The default read deadline while draining: a socket that gets nothing for
/// this long is considered idle. Long enough to ride out a scheduling hiccup,
/// short enough that a drained generation goes away quickly.
pub const DEFAULT_READ_DEADLINE: Duration = Duration::from_millis(200);

/// Receive buffer size for the serve helpers: the largest UDP payload (65,507
/// bytes over IPv4, 65,527 over IPv6) fits, so nothing is truncated.
pub const MAX_DATAGRAM: usize = 65536;

/// Whether the worker has been asked to drain.
///
/// Cloning is cheap and clones share the flag, so one `DrainSignal` can be
/// handed to every serving thread (or task).
#[derive(Clone, Debug)]
pub struct DrainSignal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Set by the signal handler (or [`DrainSignal::request`]). An
    /// `Arc<AtomicBool>` because that is what signal-hook's flag handler takes.
    flag: Arc<AtomicBool>,
    signal: Option<c_int>,
    /// Wakes async waiters at once; see `DrainSignal::wait`.
    #[cfg(feature = "tokio")]
    wake: ::tokio::sync::Notify,
}

impl DrainSignal {
    /// The signal the supervisor sends unless configured otherwise.
    pub const DEFAULT_SIGNAL: c_int = libc::SIGTERM;

    /// Catches `signal` and turns it into a drain request.
    ///
    /// From now on `signal` no longer terminates the process; it sets the flag
    /// that [`requested`](DrainSignal::requested) reads. A *second* delivery,
    /// while the first is still being handled, exits at once with status 1:
    /// the classic "press Ctrl-C twice" escape hatch when running by hand.
    ///
    /// Install it before announcing readiness, so that a drain signal can never
    /// arrive while the default disposition (terminate) is still in place.
    /// The handler stays installed for the life of the process.
    pub fn install(signal: c_int) -> Result<DrainSignal, Error> {
        check_signal(signal, &signal.to_string())?;
        let flag = Arc::new(AtomicBool::new(false));
        let hook_error =
            |e: io::Error| Error::io(format!("installing a handler for signal {signal}"), e);
        // Handlers for one signal run in registration order. This one runs
        // first and sees the flag as it was *before* this delivery: set means
        // this is the second signal, so exit.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&flag))
            .map_err(hook_error)?;
        signal_hook::flag::register(signal, Arc::clone(&flag)).map_err(hook_error)?;
        Ok(DrainSignal::with_flag(flag, Some(signal)))
    }

    /// [`install`](DrainSignal::install) for a signal given by name
    /// (`"SIGTERM"`, `"TERM"`, `"sigusr2"`) or number (`"15"`), as in the
    /// supervisor's `drain_signal` setting. See [`parse_signal`].
    pub fn install_named(name: &str) -> Result<DrainSignal, Error> {
        DrainSignal::install(parse_signal(name)?)
    }

    /// [`install`](DrainSignal::install) for SIGTERM.
    pub fn install_default() -> Result<DrainSignal, Error> {
        DrainSignal::install(DrainSignal::DEFAULT_SIGNAL)
    }

    /// A drain flag no signal sets, only [`request`](DrainSignal::request):
    /// for workers that learn about draining some other way, and for tests.
    pub fn manual() -> DrainSignal {
        DrainSignal::with_flag(Arc::new(AtomicBool::new(false)), None)
    }

    pub(crate) fn with_flag(flag: Arc<AtomicBool>, signal: Option<c_int>) -> DrainSignal {
        DrainSignal {
            inner: Arc::new(Inner {
                flag,
                signal,
                #[cfg(feature = "tokio")]
                wake: ::tokio::sync::Notify::new(),
            }),
        }
    }

    /// Whether draining has been requested. Cheap: one atomic load.
    pub fn requested(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// Requests draining, as the signal would.
    pub fn request(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        #[cfg(feature = "tokio")]
        self.inner.wake.notify_waiters();
    }

    /// The signal that requests draining, if one was installed.
    pub fn signal(&self) -> Option<c_int> {
        self.inner.signal
    }

    /// Waits until draining is requested.
    ///
    /// [`request`](DrainSignal::request) and signals installed with
    /// [`crate::tokio::drain_signal_async`] wake it at once. A signal-hook
    /// handler ([`install`](DrainSignal::install)) cannot wake a task — only
    /// async-signal-safe work is allowed in a signal handler — so the flag is
    /// also re-checked every [`POLL_INTERVAL`].
    #[cfg(feature = "tokio")]
    pub async fn wait(&self) {
        loop {
            // Register interest *before* checking the flag, so a request
            // between the check and the await cannot be missed.
            let mut notified = std::pin::pin!(self.inner.wake.notified());
            notified.as_mut().enable();
            if self.requested() {
                return;
            }
            let _ = ::tokio::time::timeout(POLL_INTERVAL, notified).await;
        }
    }
}

/// Turns a signal name or number into its number, refusing signals that
/// cannot be caught (`SIGKILL`, `SIGSTOP`) or must not be
/// (`SIGSEGV`, `SIGILL`, `SIGFPE`: the process is broken, not draining).
///
/// Accepts `"SIGTERM"`, `"TERM"`, any case, and numbers like `"15"`.
pub fn parse_signal(name: &str) -> Result<c_int, Error> {
    let trimmed = name.trim();
    let bad = |reason: &str| Error::BadSignal {
        value: name.to_owned(),
        reason: reason.to_owned(),
    };
    let signal = if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        let number: c_int = trimmed.parse().map_err(|_| bad("not a signal number"))?;
        Signal::try_from(number).map_err(|_| bad("not a signal number"))?
    } else {
        let upper = trimmed.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Signal::from_str(&full).map_err(|_| bad("not a signal name (expected e.g. SIGTERM)"))?
    };
    check_signal(signal as c_int, name)?;
    Ok(signal as c_int)
}

fn check_signal(signal: c_int, as_given: &str) -> Result<(), Error> {
    if signal_hook::consts::FORBIDDEN.contains(&signal) {
        return Err(Error::BadSignal {
            value: as_given.to_owned(),
            reason: "this signal cannot be caught, or must not be".to_owned(),
        });
    }
    Ok(())
}

/// What one serve loop did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Datagrams received and handed to the handler.
    pub datagrams: u64,
    /// How many of them were received after draining was requested.
    pub after_drain: u64,
}

impl AddAssign for Served {
    fn add_assign(&mut self, other: Served) {
        self.datagrams += other.datagrams;
        self.after_drain += other.after_drain;
    }
}

impl std::iter::Sum for Served {
    fn sum<I: Iterator<Item = Served>>(iter: I) -> Served {
        iter.fold(Served::default(), |mut total, s| {
            total += s;
            total
        })
    }
}

/// Serves `socket` until draining is requested and the socket is then idle
/// for `read_deadline`.
///
/// Every datagram received goes to `handler(socket, request, peer)`, which may
/// reply with `socket.send_to(.., peer)`. The receive buffer
/// ([`MAX_DATAGRAM`] bytes) is allocated once; the handler borrows from it.
///
/// The socket is put in blocking mode with a read timeout (`SO_RCVTIMEO`):
/// [`POLL_INTERVAL`] until draining, `read_deadline` after (at least 1 ms).
/// Those are properties of the socket, shared by every fd that refers to it.
///
/// Returns when drained, or on a receive error other than a timeout or
/// an interruption.
pub fn serve_until_drained<H>(
    socket: &UdpSocket,
    drain: &DrainSignal,
    read_deadline: Duration,
    mut handler: H,
) -> io::Result<Served>
where
    H: FnMut(&UdpSocket, &[u8], SocketAddr),
{
    // A zero timeout means "block forever" to the kernel, and std refuses it.
    let read_deadline = read_deadline.max(Duration::from_millis(1));
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(POLL_INTERVAL))?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut served = Served::default();
    let mut draining = false;
    // Idle is counted from the last datagram, not from when the drain request
    // was noticed: time the socket already spent idle before (up to a poll
    // interval, typically the time since the flip) counts toward the deadline.
    let mut last_datagram = Instant::now();
    // The read timeout now set, to change it only when needed.
    let mut timeout = POLL_INTERVAL;
    // Whether a read has been made since draining began: at least one is, so
    // whatever is queued at that moment is served.
    let mut read_while_draining = false;
    loop {
        if drain.requested() {
            draining = true;
            let idle = last_datagram.elapsed();
            if read_while_draining && idle >= read_deadline {
                // A whole read deadline without a datagram: idle, done.
                return Ok(served);
            }
            // The rest of the deadline (at least 1 ms: see above).
            let wait = read_deadline
                .saturating_sub(idle)
                .max(Duration::from_millis(1));
            if wait != timeout {
                socket.set_read_timeout(Some(wait))?;
                timeout = wait;
            }
        }
        let received = socket.recv_from(&mut buf);
        read_while_draining |= draining;
        match received {
            Ok((len, peer)) => {
                handler(socket, &buf[..len], peer);
                served.datagrams += 1;
                served.after_drain += u64::from(draining);
                last_datagram = Instant::now();
            }
            // A read timeout shows up as WouldBlock on Linux (EAGAIN); while
            // draining, the loop's head decides whether the socket was idle long
            // enough.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            // A signal (likely the drain signal itself): loop to look at the flag.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // An ICMP error for an earlier reply, reported on this socket
            // (connected sockets, IP_RECVERR). It concerns one peer, not us.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
}

/// [`serve_until_drained`] for several sockets: one thread per socket, since
/// each thread then simply blocks in `recv_from` on its own socket, and
/// the sockets are served in parallel on as many CPUs as there are sockets.
///
/// `make_handler(index)` is called in each socket's thread to build that
/// socket's handler, so each handler owns its state (buffers, counters)
/// without locks. Results come back in socket order.
///
/// If one socket fails (receive error, or its handler panics), draining is
/// requested for all, so the others finish what is queued and return; then
/// the first error is returned (or the panic resumed). A worker that returns
/// an error exits non-zero, and the supervisor restarts it.
pub fn serve_all_until_drained<M, H>(
    sockets: &[UdpSocket],
    drain: &DrainSignal,
    read_deadline: Duration,
    make_handler: M,
) -> io::Result<Vec<Served>>
where
    M: Fn(usize) -> H + Sync,
    H: FnMut(&UdpSocket, &[u8], SocketAddr),
{
    thread::scope(|scope| {
        let make_handler = &make_handler;
        let mut threads = Vec::with_capacity(sockets.len());
        for (index, socket) in sockets.iter().enumerate() {
            let spawned = thread::Builder::new()
                .name(format!("udp-serve-{index}"))
                .spawn_scoped(scope, move || {
                    let _on_panic = DrainOnPanic(drain);
                    let result =
                        serve_until_drained(socket, drain, read_deadline, make_handler(index));
                    if result.is_err() {
                        drain.request();
                    }
                    result
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    // The threads already running stop once drained; the
                    // scope waits for them before we return.
                    drain.request();
                    return Err(e);
                }
            }
        }
        let mut served = Vec::with_capacity(threads.len());
        let mut first_error = None;
        for handle in threads {
            match handle.join() {
                Ok(Ok(s)) => served.push(s),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(served),
        }
    })
}

/// Requests draining if dropped while panicking, so sibling threads stop.
struct DrainOnPanic<'a>(&'a DrainSignal);

impl Drop for DrainOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.request();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn signal_names_and_numbers() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("term").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal(" SIGUSR2 ").unwrap(), libc::SIGUSR2);
        assert_eq!(parse_signal("SIGINT").unwrap(), libc::SIGINT);
        assert_eq!(parse_signal("10").unwrap(), libc::SIGUSR1);
        let err = parse_signal("SIGKILL").unwrap_err().to_string();
        assert_eq!(
            err,
            r#"drain signal "SIGKILL": this signal cannot be caught, or must not be"#
        );
        assert!(parse_signal("SIGSEGV").is_err());
        assert!(
            parse_signal("SIGFOO")
                .unwrap_err()
                .to_string()
                .contains("not a signal name")
        );
        assert!(parse_signal("").is_err());
        assert!(parse_signal("999").is_err());
    }

    fn pair() -> (UdpSocket, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        (server, client)
    }

    fn echo(socket: &UdpSocket, request: &[u8], peer: SocketAddr) {
        socket.send_to(request, peer).unwrap();
    }

    #[test]
    fn serves_everything_queued_then_returns_once_idle() {
        let (server, client) = pair();
        // Queued before serving even starts, and the drain already requested:
        // the worst case, a worker told to drain before reading anything.
        for i in 0u32..50 {
            client.send(&i.to_le_bytes()).unwrap();
        }
        let drain = DrainSignal::manual();
        drain.request();
        let deadline = Duration::from_millis(150);
        let started = Instant::now();
        let served = serve_until_drained(&server, &drain, deadline, echo).unwrap();
        let took = started.elapsed();
        assert_eq!(
            served,
            Served {
                datagrams: 50,
                after_drain: 50
            }
        );
        assert!(
            took >= deadline,
            "returned before the socket was idle for the deadline: {took:?}"
        );
        assert!(took < deadline * 10, "took {took:?}");

        client
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut buf = [0u8; 8];
        for i in 0u32..50 {
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], i.to_le_bytes());
        }
    }

    #[test]
    fn keeps_serving_until_the_drain_request() {
        let (server, client) = pair();
        let drain = DrainSignal::manual();
        thread::scope(|s| {
            let serving =
                s.spawn(|| serve_until_drained(&server, &drain, Duration::from_millis(100), echo));
            // Longer than several poll intervals: an idle socket is not a
            // reason to stop while nobody asked us to.
            thread::sleep(POLL_INTERVAL * 3);
            assert!(!serving.is_finished());
            client.send(b"before").unwrap();
            thread::sleep(Duration::from_millis(50));
            drain.request();
            client.send(b"after").unwrap();
            let served = serving.join().unwrap().unwrap();
            assert_eq!(served.datagrams, 2);
        });
    }

    #[test]
    fn a_signal_requests_draining() {
        // SIGUSR2 is otherwise unused by the test harness; no other test
        // raises it, so this is the only handler that sees it.
        let drain = DrainSignal::install_named("SIGUSR2").unwrap();
        assert_eq!(drain.signal(), Some(libc::SIGUSR2));
        assert!(!drain.requested());
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        // The handler runs before raise() returns for a signal sent to
        // ourselves, but allow for it being delivered to another thread.
        let started = Instant::now();
        while !drain.requested() && started.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(drain.requested());
    }

    #[test]
    fn all_sockets_are_served_by_their_own_handler() {
        let pairs: Vec<_> = (0..3).map(|_| pair()).collect();
        let servers: Vec<UdpSocket> = pairs.iter().map(|(s, _)| s.try_clone().unwrap()).collect();
        for (i, (_, client)) in pairs.iter().enumerate() {
            for _ in 0..=i {
                client.send(b"x").unwrap();
            }
        }
        let drain = DrainSignal::manual();
        drain.request();
        let served =
            serve_all_until_drained(&servers, &drain, Duration::from_millis(100), |index| {
                move |socket: &UdpSocket, _request: &[u8], peer| {
                    socket.send_to(&[index as u8], peer).unwrap();
                }
            })
            .unwrap();
        let counts: Vec<u64> = served.iter().map(|s| s.datagrams).collect();
        assert_eq!(counts, [1, 2, 3]);
        assert_eq!(served.into_iter().sum::<Served>().datagrams, 6);
        for (i, (_, client)) in pairs.iter().enumerate() {
            let mut buf = [0u8; 1];
            client.recv(&mut buf).unwrap();
            assert_eq!(buf[0], i as u8, "socket {i} answered by its own handler");
        }
    }

    #[test]
    fn a_panicking_handler_drains_the_others() {
        let (a, a_client) = pair();
        let (b, _b_client) = pair();
        let drain = DrainSignal::manual();
        a_client.send(b"boom").unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_all_until_drained(&[a, b], &drain, Duration::from_millis(50), |index| {
                move |_: &UdpSocket, _: &[u8], _| {
                    if index == 0 {
                        panic!("handler failure");
                    }
                }
            })
        }));
        assert!(result.is_err(), "the panic is passed on");
        assert!(drain.requested(), "and the other socket was told to drain");
    }
}
