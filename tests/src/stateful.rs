//! Clients of the stateful example worker (`stateful-worker`), for the tests of
//! `flow` and `cookie` affinity: the worker counts datagrams per client, so a client
//! that lands on another worker (or generation) sees its count start over.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

use crate::{PinDir, ServiceConfig, TempDir, bin_path};

/// One reply of the stateful worker.
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    pub generation: u32,
    pub worker: u16,
    pub count: u64,
    pub cookie: u16,
}

/// A reply's fields, or None if it is too short to be one.
pub fn parse(reply: &[u8]) -> Option<Reply> {
    if reply.len() < 34 {
        return None;
    }
    Some(Reply {
        generation: u32::from_le_bytes(reply[16..20].try_into().ok()?),
        worker: u16::from_le_bytes(reply[20..22].try_into().ok()?),
        count: u64::from_le_bytes(reply[24..32].try_into().ok()?),
        cookie: u16::from_be_bytes(reply[32..34].try_into().ok()?),
    })
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct ClientLog {
    pub replies: Vec<Reply>,
    /// Requests that got no reply within 2 s.
    pub lost: u64,
}

impl ClientLog {
    /// The generations that answered, in order, each once per run of replies.
    pub fn generations(&self) -> Vec<u32> {
        let mut g: Vec<u32> = self.replies.iter().map(|r| r.generation).collect();
        g.dedup();
        g
    }

    /// Where the replies changed worker: (reply index, generation, worker, count),
    /// the first reply included.
    pub fn moves(&self) -> Vec<(usize, u32, u16, u64)> {
        let mut last = None;
        let mut changes = Vec::new();
        for (i, r) in self.replies.iter().enumerate() {
            if last != Some((r.generation, r.worker)) {
                changes.push((i, r.generation, r.worker, r.count));
                last = Some((r.generation, r.worker));
            }
        }
        changes
    }

    /// Its state never reset: counts run 1, 2, 3, ... on one worker.
    pub fn assert_state_kept(&self, who: &str) {
        if let Some(first) = self.replies.first() {
            assert!(
                self.replies
                    .iter()
                    .all(|r| (r.generation, r.worker) == (first.generation, first.worker)),
                "{who}: moved between workers: {:?}",
                self.replies
            );
        }
        for (i, r) in self.replies.iter().enumerate() {
            assert_eq!(
                r.count,
                i as u64 + 1,
                "{who}: reply {i} has count {} (state reset: the client moved to another worker); replies: {:?}",
                r.count,
                self.replies
            );
        }
    }
}

/// A client that sends up to `datagrams` requests (`u64::MAX`: until `stop`), one
/// every `interval`, each waiting for its reply; with `echo_cookie` it puts the
/// cookie of the last reply into the next request, as a cookie-mode client (a QUIC
/// client echoing its connection id) does. Stops early when `stop` is set.
pub fn client(
    target: SocketAddr,
    datagrams: u64,
    interval: Duration,
    echo_cookie: bool,
    stop: Arc<AtomicBool>,
) -> ClientLog {
    // The loopback address of the target's family: the tests' services listen on
    // 127.0.0.1 or ::1.
    let local: IpAddr = if target.is_ipv6() {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let socket = UdpSocket::bind((local, 0)).unwrap();
    socket.connect(target).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut log = ClientLog::default();
    let mut cookie = 0u16;
    let mut buf = [0u8; 128];
    for sequence in 0..datagrams {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut request = [0u8; 16];
        request[..2].copy_from_slice(&cookie.to_be_bytes());
        request[8..].copy_from_slice(&sequence.to_le_bytes());
        socket.send(&request).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let reply = parse(&buf[..n]).expect("a well-formed stateful reply");
                if echo_cookie {
                    cookie = reply.cookie;
                }
                log.replies.push(reply);
            }
            Err(_) => log.lost += 1,
        }
        std::thread::sleep(interval);
    }
    log
}

/// A service of 4 `stateful-worker`s on `address` with `balance` (and `extra`
/// listener keys), `flow_idle` 2 s and a 30 s drain timeout; its name is `prefix`
/// and the end of the namespace's name, so services of parallel tests differ.
pub fn config(
    prefix: &str,
    net_name: &str,
    address: SocketAddr,
    balance: &str,
    pins: &PinDir,
    run: &TempDir,
    extra: &str,
) -> ServiceConfig {
    let mut config = ServiceConfig::new(
        &format!("{prefix}-{}", &net_name[net_name.len().saturating_sub(6)..]),
        vec![bin_path("stateful-worker").to_string_lossy().into_owned()],
        4,
        address,
        pins,
        run.path(),
    );
    config.drain_timeout = Some(Duration::from_secs(30));
    config.flow_idle = Some(Duration::from_secs(2));
    config.extra_toml = format!("balance = \"{balance}\"\n{extra}");
    config
}
