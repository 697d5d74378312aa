//! Baseline: a plain `SO_REUSEPORT` group with no eBPF program attached.
//!
//! The kernel then picks the socket by a hash of the 4-tuple, so one sender lands on
//! one socket; the spread tests run this next to the supervisor to show the contrast.
//! Each socket answers with the same echo trailer as the example workers (generation 0,
//! worker = socket index), so the load generator can drive both.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
};

use crate::echo::{Trailer, make_reply};

/// Generation reported in the trailer of the baseline's replies.
pub const PLAIN_GENERATION: u32 = 0;

/// `n` reuseport sockets on one address, one echo thread each, stopped on drop.
pub struct PlainReuseportGroup {
    addr: SocketAddr,
    counts: Vec<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PlainReuseportGroup {
    /// Binds `n` sockets to `addr` (port 0: the port the first one got) in the calling
    /// thread's network namespace. All are bound before any thread starts, so the group
    /// is complete before the first datagram can arrive.
    pub fn bind(addr: SocketAddr, n: usize) -> io::Result<PlainReuseportGroup> {
        assert!(n > 0 && n <= u16::MAX as usize, "1..=65535 sockets");
        let mut sockets = Vec::with_capacity(n);
        let mut bound = addr;
        for _ in 0..n {
            let s = reuseport_socket(bound)?;
            bound = s.local_addr()?;
            sockets.push(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Vec<_> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut threads = Vec::with_capacity(n);
        for (i, sock) in sockets.into_iter().enumerate() {
            let (stop, count) = (stop.clone(), counts[i].clone());
            let trailer = Trailer {
                generation: PLAIN_GENERATION,
                worker: i as u16,
                socket: 0,
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("plain-{i}"))
                    .spawn(move || echo_loop(sock, trailer, &count, &stop))?,
            );
        }
        Ok(PlainReuseportGroup {
            addr: bound,
            counts,
            stop,
            threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far, per socket index.
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Stops the threads, closes the sockets and returns the final counts.
    pub fn stop(mut self) -> Vec<u64> {
        self.shutdown();
        self.counts()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for PlainReuseportGroup {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn reuseport_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd: OwnedFd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    // Room for the whole burst of a test: the baseline must measure distribution, not
    // the default ~256-datagram buffer.
    setsockopt(&fd, sockopt::RcvBufForce, &(16usize << 20))?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    let sock = UdpSocket::from(fd);
    // The thread wakes up this often to notice `stop`.
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(sock)
}

fn echo_loop(sock: UdpSocket, trailer: Trailer, count: &AtomicU64, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = sock.send_to(&make_reply(&buf[..n], trailer), from);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                eprintln!("plain reuseport socket {}: {e}", trailer.worker);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The baseline measurement: a plain group of `sockets` sockets on `addr` inside `net`,
/// driven by one sending socket with `count` datagrams at `rate`/s. Returns the per-socket
/// counts and the load generator's report.
pub fn run_plain_baseline(
    net: &crate::TestNet,
    addr: SocketAddr,
    sockets: usize,
    count: u64,
    rate: u64,
) -> (Vec<u64>, crate::Report) {
    net.run_in(|| {
        let group = PlainReuseportGroup::bind(addr, sockets).expect("bind plain reuseport group");
        let report = crate::loadgen::run(
            &crate::LoadConfig::new(group.local_addr())
                .count(count)
                .rate(rate),
        )
        .expect("load generator");
        (group.stop(), report)
    })
}

/// Asserts the kernel's 4-tuple hash put every datagram of the single sender on one
/// socket, and none was lost on the way.
pub fn assert_one_socket_got_all(counts: &[u64], sent: u64) {
    let busy: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
    assert_eq!(
        busy.len(),
        1,
        "plain SO_REUSEPORT should put one sender on one socket; per-socket counts {counts:?}"
    );
    assert_eq!(
        counts[busy[0]], sent,
        "that socket should have received everything sent; per-socket counts {counts:?}"
    );
}

/// One line per socket, for printing next to the supervisor's distribution.
pub fn format_counts(counts: &[u64]) -> String {
    let total = counts.iter().sum::<u64>().max(1) as f64;
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| format!("  socket {i}: {c} ({:.1}%)\n", *c as f64 * 100.0 / total))
        .collect()
}
