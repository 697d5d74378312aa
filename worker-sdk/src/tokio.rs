//! The async side (feature `tokio`): tokio sockets, a drain signal that wakes
//! tasks, and the async serve loop.
//!
//! The shape is the same as the std helpers: take the sockets with
//! [`Listeners`], announce readiness with [`crate::notify_ready`], serve until
//! drained. What differs is how the two waits are done:
//!
//! * waiting for the drain request is a future ([`DrainSignal::wait`]), raced
//!   against `recv_from` — no polling interval;
//! * the read deadline is `tokio::time::timeout` around `recv_from`, instead
//!   of a socket timeout.
//!
//! Call [`Listeners::from_env`] *before* building the runtime if you can (it
//! only cleans the `LISTEN_*` variables out of the environment while the
//! process has a single thread), then convert inside the runtime:
//!
//! ```no_run
//! use worker_sdk::{Listeners, DEFAULT_READ_DEADLINE};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut listeners = Listeners::from_env()?;
//!     let runtime = tokio::runtime::Runtime::new()?;
//!     runtime.block_on(async {
//!         let drain = worker_sdk::tokio::drain_signal_async(libc::SIGTERM)?;
//!         let socket = listeners.take_tokio_udp("echo")?.remove(0);
//!         worker_sdk::notify_ready()?;
//!         let served = worker_sdk::tokio::serve_until_drained_async(
//!             &socket,
//!             &drain,
//!             DEFAULT_READ_DEADLINE,
//!             |request: &[u8], _peer, reply: &mut Vec<u8>| reply.extend_from_slice(request),
//!         )
//!         .await?;
//!         eprintln!("served {} datagrams", served.datagrams);
//!         Ok(())
//!     })
//! }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ::tokio::net::UdpSocket;
use ::tokio::signal::unix::{SignalKind, signal};

use crate::drain::{DrainSignal, MAX_DATAGRAM, Served};
use crate::error::Error;
use crate::listen::Listeners;

/// Makes a std socket usable by tokio: non-blocking, registered with the
/// current runtime's reactor. Must be called from inside a runtime.
pub fn into_tokio(socket: std::net::UdpSocket) -> io::Result<UdpSocket> {
    // tokio requires non-blocking sockets; from_std does not change the mode.
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

impl Listeners {
    /// [`take_udp`](Listeners::take_udp), converted with [`into_tokio`].
    /// Must be called from inside a runtime.
    pub fn take_tokio_udp(&mut self, name: &str) -> Result<Vec<UdpSocket>, Error> {
        self.take_udp(name)?
            .into_iter()
            .map(|socket| {
                into_tokio(socket)
                    .map_err(|e| Error::io(format!("registering a {name:?} socket with tokio"), e))
            })
            .collect()
    }
}

/// Catches `signal` with tokio and turns it into a drain request that wakes
/// [`DrainSignal::wait`] at once. Must be called from inside a runtime.
///
/// As with [`DrainSignal::install`], a second delivery exits the process at
/// once with status 1, and the signal no longer terminates the process.
pub fn drain_signal_async(signal_number: libc::c_int) -> Result<DrainSignal, Error> {
    // Validates the number and refuses SIGKILL & co, with the same message.
    crate::drain::parse_signal(&signal_number.to_string())?;
    // Registering here, synchronously, rather than inside the task below
    // means no signal can slip through between this call and the task's
    // first poll.
    let mut stream = signal(SignalKind::from_raw(signal_number)).map_err(|e| {
        Error::io(
            format!("installing a tokio handler for signal {signal_number}"),
            e,
        )
    })?;
    let drain = DrainSignal::with_flag(Arc::new(AtomicBool::new(false)), Some(signal_number));
    let requester = drain.clone();
    ::tokio::spawn(async move {
        if stream.recv().await.is_some() {
            requester.request();
        }
        if stream.recv().await.is_some() {
            std::process::exit(1);
        }
    });
    Ok(drain)
}

/// Serves `socket` until draining is requested and the socket is then idle
/// for `read_deadline`; the async twin of [`crate::serve_until_drained`].
///
/// `handler(request, peer, reply)` is called for every datagram with `reply`
/// empty; whatever it leaves in `reply` is sent back to `peer` (nothing, if it
/// leaves it empty). Both buffers are allocated once and reused, so serving
/// allocates nothing per datagram.
///
/// Why a plain closure and not an async one: an async closure that borrows
/// its arguments (the datagram lives in our buffer) yields futures the
/// compiler cannot yet prove `Send` for every borrow ("implementation of
/// `Send` is not general enough"), so the serve loop could not be passed to
/// `tokio::spawn`. Handlers with slow work per datagram can spawn a task
/// themselves (with an `Arc` of the socket to reply from).
///
/// Cancel-safe between datagrams: tokio's `recv_from` loses nothing when the
/// race against the drain request drops it.
pub async fn serve_until_drained_async<H>(
    socket: &UdpSocket,
    drain: &DrainSignal,
    read_deadline: Duration,
    mut handler: H,
) -> io::Result<Served>
where
    H: FnMut(&[u8], SocketAddr, &mut Vec<u8>),
{
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut reply = Vec::with_capacity(MAX_DATAGRAM);
    let mut served = Served::default();
    loop {
        let draining = drain.requested();
        let received = if draining {
            match ::tokio::time::timeout(read_deadline, socket.recv_from(&mut buf)).await {
                Ok(result) => result,
                // A whole read deadline without a datagram: idle, done.
                Err(_elapsed) => return Ok(served),
            }
        } else {
            ::tokio::select! {
                result = socket.recv_from(&mut buf) => result,
                // Loop around to switch to reading with the deadline.
                () = drain.wait() => continue,
            }
        };
        match received {
            Ok((len, peer)) => {
                reply.clear();
                handler(&buf[..len], peer, &mut reply);
                if !reply.is_empty() {
                    // A failed reply concerns one peer (unreachable, buffer
                    // full): like a lost datagram, it is not the worker's
                    // failure, so it does not end the serve loop.
                    let _ = socket.send_to(&reply, peer).await;
                }
                served.datagrams += 1;
                served.after_drain += u64::from(draining);
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    async fn pair() -> (UdpSocket, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(server.local_addr().unwrap()).await.unwrap();
        (server, client)
    }

    #[::tokio::test]
    async fn serves_queued_datagrams_then_returns_once_idle() {
        let (server, client) = pair().await;
        let drain = DrainSignal::manual();
        let serving = {
            let drain = drain.clone();
            ::tokio::spawn(async move {
                let mut replies = 0u32;
                let served = serve_until_drained_async(
                    &server,
                    &drain,
                    Duration::from_millis(150),
                    |request: &[u8], _peer, reply: &mut Vec<u8>| {
                        reply.extend_from_slice(request);
                        replies += 1;
                    },
                )
                .await
                .unwrap();
                (served, replies)
            })
        };
        client.send(b"first").await.unwrap();
        ::tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            !serving.is_finished(),
            "idle but not draining: still serving"
        );

        for i in 0u32..20 {
            client.send(&i.to_le_bytes()).await.unwrap();
        }
        drain.request();
        let started = Instant::now();
        let (served, replies) = serving.await.unwrap();
        assert_eq!(served.datagrams, 21);
        assert_eq!(replies, 21);
        assert!(started.elapsed() >= Duration::from_millis(150));

        let mut buf = [0u8; 16];
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"first");
    }

    #[::tokio::test]
    async fn a_tokio_signal_wakes_waiters() {
        // SIGUSR1: unused elsewhere in these tests (the std test uses SIGUSR2).
        let drain = drain_signal_async(libc::SIGUSR1).unwrap();
        let waiter = {
            let drain = drain.clone();
            ::tokio::spawn(async move { drain.wait().await })
        };
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR1).unwrap();
        ::tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(drain.requested());
    }

    #[::tokio::test]
    async fn forbidden_signals_are_refused() {
        assert!(drain_signal_async(libc::SIGKILL).is_err());
    }

    #[::tokio::test]
    async fn listeners_convert_to_tokio() {
        let mut listeners = Listeners::from_env().unwrap();
        assert!(listeners.take_tokio_udp("anything").unwrap().is_empty());
        let socket = into_tokio(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        assert!(socket.local_addr().is_ok());
    }
}
