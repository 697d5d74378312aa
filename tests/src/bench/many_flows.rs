//! A sender of many flows for the selector-cost figure's "many flows" row.
//!
//! The load generator gives every flow (socket) two threads, which is right for
//! echo runs of a few flows and useless for thousands. This sender opens its flows'
//! sockets up front, sends one datagram on each so the selector knows them all, and
//! then goes round them one datagram at a time from a few threads: every datagram
//! is a known flow, and consecutive datagrams are different flows, which is what a
//! busy resolver or collector with thousands of clients sees. Nothing is read back
//! (the cost rows run workers that answer nothing).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Flows of the row, over all sending threads: four times what the selector's
/// per-CPU flow cache holds (`FLOW_CACHE_ENTRIES`), and within the default file
/// limit of a root shell here (20 000) with the benchmark's own files.
pub const FLOWS: usize = 16 * 1024;

/// The flows of the row, opened (in the caller's network namespace) and known to
/// the selector once [`ManyFlows::open`] returns.
pub struct ManyFlows {
    /// One group of sockets per sending thread.
    groups: Vec<Vec<UdpSocket>>,
}

impl ManyFlows {
    /// Opens [`FLOWS`] sockets connected to `target` (one ephemeral port each: one
    /// flow each), shared out over `senders` threads, and sends one datagram on each.
    pub fn open(target: SocketAddr, senders: usize) -> io::Result<ManyFlows> {
        raise_fd_limit(FLOWS + 512)?;
        let senders = senders.max(1);
        let bind: SocketAddr = match target {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
            SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
        };
        let mut groups = Vec::with_capacity(senders);
        for i in 0..senders {
            let share = FLOWS / senders + usize::from(i < FLOWS % senders);
            let mut group = Vec::with_capacity(share);
            for _ in 0..share {
                let socket = UdpSocket::bind(bind)?;
                socket.connect(target)?;
                socket.send(&[0u8; 64])?;
                group.push(socket);
            }
            groups.push(group);
        }
        Ok(ManyFlows { groups })
    }

    /// Flows in all.
    pub fn flows(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }

    /// Sends `count` 64-byte datagrams at about `rate` per second in all, each
    /// thread going round its sockets; `pin` runs first on every thread (to pin
    /// it to a CPU). Returns the datagrams sent.
    pub fn send(&self, count: u64, rate: u64, pin: impl Fn() + Sync) -> io::Result<u64> {
        let threads = self.groups.len() as u64;
        let results: Vec<io::Result<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .groups
                .iter()
                .enumerate()
                .map(|(i, group)| {
                    let quota = count / threads + u64::from((i as u64) < count % threads);
                    let per_thread_rate = (rate as f64 / threads as f64).max(1.0);
                    let pin = &pin;
                    s.spawn(move || {
                        pin();
                        send_round_robin(group, quota, per_thread_rate)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("many-flows sender panicked"))
                .collect()
        });
        results.into_iter().sum()
    }
}

/// `quota` datagrams over `sockets` in turn, paced to `rate` per second (checked
/// every 256 datagrams: finer pacing would cost more than the sends).
fn send_round_robin(sockets: &[UdpSocket], quota: u64, rate: f64) -> io::Result<u64> {
    let payload = [0x5au8; 64];
    let start = Instant::now();
    let mut sent = 0u64;
    for socket in sockets.iter().cycle() {
        if sent == quota {
            break;
        }
        match socket.send(&payload) {
            Ok(_) => sent += 1,
            // A full socket buffer on the way: the datagram was not sent, try the next.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
        if sent.is_multiple_of(256) {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(sent)
}

/// Raises the soft limit of open files to at least `want`, within the hard limit
/// (raising that needs CAP_SYS_RESOURCE, which containers often drop).
fn raise_fd_limit(want: usize) -> io::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = want as u64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft >= want {
        return Ok(());
    }
    if hard < want {
        return Err(io::Error::other(format!(
            "{want} open files needed, the hard limit is {hard} (ulimit -Hn)"
        )));
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, hard).map_err(io::Error::from)
}
