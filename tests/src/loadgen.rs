//! UDP load generator that counts echo replies per sequence number.
//!
//! Each sending socket is connected to the target (so the kernel sees one fixed 4-tuple
//! per socket: one "flow") and gets two threads: a sender using `sendmmsg` paced by a
//! token schedule, and a receiver using `recvmmsg` that records, per sequence number, how
//! many replies came, and who answered (the echo trailer). Sockets are created in the
//! calling thread's network namespace: call [`run`] inside [`crate::TestNet::run_in`].
//!
//! Sequence numbers are interleaved over the senders (`seq = k * senders + sender`), so
//! they are unique across the whole run and each receiver indexes its own dense table
//! by `k`.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, recvmmsg, sendmmsg, setsockopt, sockopt,
};

use crate::echo::{SEQ_LEN, TRAILER_LEN, Trailer, parse_reply};

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// Number of sending sockets (flows); each has a sender and a receiver thread.
    pub senders: usize,
    /// Total datagrams over all senders. At least one of `count`/`duration` is required;
    /// with both, whichever ends first.
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    /// Total datagrams per second over all senders; `None` = as fast as possible.
    pub rate: Option<u64>,
    /// Request size in bytes (>= 8): the sequence number, then padding.
    pub payload_size: usize,
    /// Largest `sendmmsg` batch (at most 1024, what the kernel sends per call). Paced runs
    /// use about 1 ms worth of datagrams per batch.
    pub max_batch: usize,
    /// How long to wait for replies after the last send (ends early once all came).
    pub grace: Duration,
    /// Receive buffer of each sending socket (SO_RCVBUFFORCE), so replies are not dropped
    /// at our end and counted as lost by the service.
    pub recv_buffer: usize,
    /// 16-bit values written into each request behind the sequence number (e.g. the
    /// cookie the selector's `cookie` mode steers by); `None`: padding only.
    pub stamp: Option<PayloadStamp>,
    /// Record replies per [`TIMELINE_BUCKET`] per generation over this much time from the
    /// start of sending (see [`Timeline`]); `None`: no time series.
    pub timeline: Option<Duration>,
    /// Record when each lost and each duplicated datagram was sent
    /// ([`Report::lost_at`], [`Report::duplicated_at`]), to the millisecond.
    pub record_losses: bool,
    /// The sending sockets' source address (one of this namespace's own); `None`: the
    /// kernel picks it. A second source lets a test send as a sender that the XDP
    /// filter denies.
    pub source: Option<IpAddr>,
}

/// A 16-bit big-endian value written at a fixed payload offset of every request.
///
/// Sender `i` writes `values[(k + i) % values.len()]` into its `k`-th datagram: one value
/// is a fixed stamp, several rotate datagram by datagram (so one flow can name every
/// socket of a generation in turn, and several flows start at different values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadStamp {
    /// Offset in the payload; at least 8, since bytes 0..8 are the sequence number.
    pub offset: usize,
    pub values: Vec<u16>,
}

impl PayloadStamp {
    /// The value of sender `sender`'s `k`-th datagram.
    fn value(&self, sender: usize, k: u64) -> u16 {
        let n = self.values.len() as u64;
        self.values[((k + sender as u64 % n) % n) as usize]
    }
}

impl LoadConfig {
    /// One sender, 64-byte requests, no count or duration yet (set one).
    pub fn new(target: SocketAddr) -> LoadConfig {
        LoadConfig {
            target,
            senders: 1,
            count: None,
            duration: None,
            rate: None,
            payload_size: 64,
            max_batch: 64,
            grace: Duration::from_secs(1),
            recv_buffer: 16 << 20,
            stamp: None,
            timeline: None,
            record_losses: false,
            source: None,
        }
    }
    pub fn senders(mut self, n: usize) -> Self {
        self.senders = n;
        self
    }
    pub fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self
    }
    pub fn rate(mut self, per_sec: u64) -> Self {
        self.rate = Some(per_sec);
        self
    }
    pub fn flat_out(mut self) -> Self {
        self.rate = None;
        self
    }
    pub fn payload_size(mut self, n: usize) -> Self {
        self.payload_size = n;
        self
    }
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }
    pub fn grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.recv_buffer = bytes;
        self
    }
    /// Writes `values` (big-endian u16, rotating per datagram; see [`PayloadStamp`]) at
    /// `offset` of every request. The run fails with `InvalidInput` unless
    /// `8 <= offset` and `offset + 2 <= payload_size`, and `values` is not empty.
    pub fn stamp(mut self, offset: usize, values: Vec<u16>) -> Self {
        self.stamp = Some(PayloadStamp { offset, values });
        self
    }
    /// Also records when the replies came, per generation, for the first `span` of the
    /// run (replies after that are counted in [`Timeline::late`]).
    pub fn timeline(mut self, span: Duration) -> Self {
        self.timeline = Some(span);
        self
    }
    /// Also records when each lost or duplicated datagram was sent (see
    /// [`Report::lost_at`]), to attribute losses to what happened at that moment.
    pub fn record_losses(mut self) -> Self {
        self.record_losses = true;
        self
    }
    /// Sends from `addr` (see [`LoadConfig::source`]).
    pub fn source(mut self, addr: IpAddr) -> Self {
        self.source = Some(addr);
        self
    }
}

/// Width of one bucket of a [`Timeline`].
pub const TIMELINE_BUCKET: Duration = Duration::from_millis(10);

/// Generations one receiver tells apart in its time series; replies of any further
/// generation count in [`Timeline::late`].
const TIMELINE_GENERATIONS: usize = 16;

/// Replies (duplicates included) per [`TIMELINE_BUCKET`] and per generation, counted by
/// arrival time at the load generator from the start of sending.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// When sending started: bucket `i` covers `start + i * TIMELINE_BUCKET` onwards.
    pub start: Option<Instant>,
    /// Buckets per generation; every vector has the same length.
    pub per_generation: BTreeMap<u32, Vec<u64>>,
    /// Replies after the recorded span, or of more generations than one receiver tells
    /// apart (16).
    pub late: u64,
}

impl Timeline {
    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.per_generation
            .values()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Seconds from the start of sending to `t` (negative if before).
    pub fn secs_at(&self, t: Instant) -> Option<f64> {
        let s = self.start?;
        Some(if t >= s {
            (t - s).as_secs_f64()
        } else {
            -(s - t).as_secs_f64()
        })
    }
}

/// One receiver's time series: a flat, preallocated array of
/// `buckets * TIMELINE_GENERATIONS` counters, so the hot path only indexes it.
struct TimelineRec {
    start: Instant,
    buckets: usize,
    generations: [u32; TIMELINE_GENERATIONS],
    known: usize,
    counts: Vec<u32>,
    late: u64,
}

impl TimelineRec {
    fn new(start: Instant, span: Duration) -> TimelineRec {
        let buckets = (span.as_nanos() / TIMELINE_BUCKET.as_nanos()).max(1) as usize + 1;
        TimelineRec {
            start,
            buckets,
            generations: [0; TIMELINE_GENERATIONS],
            known: 0,
            counts: vec![0; buckets * TIMELINE_GENERATIONS],
            late: 0,
        }
    }

    /// The bucket of now; called once per `recvmmsg` batch.
    fn bucket_now(&self) -> usize {
        (self.start.elapsed().as_nanos() / TIMELINE_BUCKET.as_nanos()) as usize
    }

    fn count(&mut self, bucket: usize, generation: u32) {
        let slot = match self.generations[..self.known]
            .iter()
            .position(|&g| g == generation)
        {
            Some(i) => Some(i),
            None if self.known < TIMELINE_GENERATIONS => {
                self.generations[self.known] = generation;
                self.known += 1;
                Some(self.known - 1)
            }
            None => None,
        };
        match slot {
            Some(i) if bucket < self.buckets => {
                let c = &mut self.counts[i * self.buckets + bucket];
                *c = c.saturating_add(1);
            }
            _ => self.late += 1,
        }
    }

    fn merge_into(self, t: &mut Timeline) {
        t.late += self.late;
        for (i, g) in self.generations[..self.known].iter().enumerate() {
            let v = t
                .per_generation
                .entry(*g)
                .or_insert_with(|| vec![0; self.buckets]);
            if v.len() < self.buckets {
                v.resize(self.buckets, 0);
            }
            for (dst, src) in v
                .iter_mut()
                .zip(&self.counts[i * self.buckets..(i + 1) * self.buckets])
            {
                *dst += u64::from(*src);
            }
        }
        let n = t.per_generation.values().map(Vec::len).max().unwrap_or(0);
        for v in t.per_generation.values_mut() {
            v.resize(n, 0);
        }
    }
}

/// Results of one sending socket.
#[derive(Clone, Debug)]
pub struct SenderReport {
    pub local: SocketAddr,
    pub sent: u64,
    /// Distinct sequence numbers answered.
    pub received: u64,
    /// Replies per (generation, worker), duplicates included.
    pub per_worker: BTreeMap<(u32, u16), u64>,
}

/// Results of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub sent: u64,
    /// Distinct sequence numbers answered at least once.
    pub received: u64,
    /// Sent but never answered.
    pub lost: u64,
    /// Replies beyond the first for a sequence number.
    pub duplicated: u64,
    /// Replies that are not an echo of one of our requests (wrong length, sequence number
    /// never sent, or belonging to another sender).
    pub malformed: u64,
    /// ECONNREFUSED seen on send or receive: an ICMP port unreachable came back, i.e. at
    /// some moment nobody was bound to the target. The refused send is retried, so it
    /// does not count as sent.
    pub refused: u64,
    /// All replies (duplicates included) per (generation, worker).
    pub per_worker: BTreeMap<(u32, u16), u64>,
    /// All replies per generation.
    pub per_generation: BTreeMap<u32, u64>,
    /// All replies per full trailer (generation, worker, socket).
    pub per_socket: BTreeMap<Trailer, u64>,
    pub per_sender: Vec<SenderReport>,
    /// From the start of sending until the last sender finished.
    pub duration: Duration,
    /// Achieved send rate, datagrams per second.
    pub rate: f64,
    /// Replies over time, when [`LoadConfig::timeline`] asked for it.
    pub timeline: Option<Timeline>,
    /// With [`LoadConfig::record_losses`]: when each datagram never answered was
    /// sent (to the millisecond), sorted.
    pub lost_at: Vec<Instant>,
    /// With [`LoadConfig::record_losses`]: when each datagram answered more than once
    /// was sent, once per extra reply, sorted.
    pub duplicated_at: Vec<Instant>,
}

impl Report {
    /// Replies counted in `per_worker` (duplicates included).
    pub fn total_replies(&self) -> u64 {
        self.per_worker.values().sum()
    }

    /// Fraction of all replies that came from (generation, worker); 0 if none came.
    pub fn share(&self, generation: u32, worker: u16) -> f64 {
        let total = self.total_replies();
        if total == 0 {
            return 0.0;
        }
        *self.per_worker.get(&(generation, worker)).unwrap_or(&0) as f64 / total as f64
    }

    /// Largest share / smallest share over the workers that answered (1.0 = perfectly
    /// even). Workers that answered nothing do not appear in `per_worker`, so check
    /// `per_worker.len()` too; infinite when nothing was answered.
    pub fn spread(&self) -> f64 {
        let max = self.per_worker.values().max().copied().unwrap_or(0);
        let min = self.per_worker.values().min().copied().unwrap_or(0);
        if min == 0 {
            f64::INFINITY
        } else {
            max as f64 / min as f64
        }
    }

    /// Every datagram sent was answered exactly once, and nothing else came back.
    pub fn assert_all_answered_once(&self) {
        assert!(self.sent > 0, "nothing was sent: {self}");
        assert_eq!(self.lost, 0, "datagrams lost: {self}");
        assert_eq!(self.duplicated, 0, "duplicate replies: {self}");
        assert_eq!(self.malformed, 0, "malformed replies: {self}");
        assert_eq!(self.received, self.sent, "{self}");
    }

    /// Machine-readable form (map keys as `"gen/worker"` strings, since JSON keys are
    /// strings).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let workers: serde_json::Map<_, _> = self
            .per_worker
            .iter()
            .map(|((g, w), n)| (format!("{g}/{w}"), json!(n)))
            .collect();
        let gens: serde_json::Map<_, _> = self
            .per_generation
            .iter()
            .map(|(g, n)| (g.to_string(), json!(n)))
            .collect();
        let sockets: serde_json::Map<_, _> = self
            .per_socket
            .iter()
            .map(|(t, n)| {
                (
                    format!("{}/{}/{}", t.generation, t.worker, t.socket),
                    json!(n),
                )
            })
            .collect();
        let senders: Vec<_> = self
            .per_sender
            .iter()
            .map(|s| {
                json!({
                    "local": s.local.to_string(),
                    "sent": s.sent,
                    "received": s.received,
                    "per_worker": s.per_worker.iter()
                        .map(|((g, w), n)| (format!("{g}/{w}"), json!(n)))
                        .collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        json!({
            "sent": self.sent,
            "received": self.received,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "malformed": self.malformed,
            "refused": self.refused,
            "per_worker": workers,
            "per_generation": gens,
            "per_socket": sockets,
            "per_sender": senders,
            "duration_secs": self.duration.as_secs_f64(),
            "rate": self.rate,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sent {} received {} lost {} duplicated {} malformed {} refused {} in {:.2}s ({:.0}/s)",
            self.sent,
            self.received,
            self.lost,
            self.duplicated,
            self.malformed,
            self.refused,
            self.duration.as_secs_f64(),
            self.rate
        )?;
        let total = self.total_replies().max(1) as f64;
        for ((g, w), n) in &self.per_worker {
            writeln!(
                f,
                "  generation {g} worker {w}: {n} ({:.1}%)",
                *n as f64 * 100.0 / total
            )?;
        }
        Ok(())
    }
}

/// Sends as configured and collects the replies. Blocks for the sending time plus at
/// most `grace`.
pub fn run(cfg: &LoadConfig) -> io::Result<Report> {
    run_inner(cfg, None)
}

/// Like [`run`], but sending also ends when `stop` becomes true (then the replies still
/// get up to `grace`). `count` and `duration` may both be unset: the run then lasts until
/// `stop`. For a load that runs while a test does something else, see [`BackgroundLoad`].
pub fn run_until(cfg: &LoadConfig, stop: &AtomicBool) -> io::Result<Report> {
    run_inner(cfg, Some(stop))
}

/// [`run`] on a thread inside the network namespace at `netns` (any nsfs path, e.g.
/// `/proc/<pid>/ns/net` of a container's PID 1).
pub fn run_in(netns: &std::path::Path, cfg: &LoadConfig) -> io::Result<Report> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(netns)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            run(cfg)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A steady load running on its own thread inside a namespace until [`finish`] (or
/// drop) stops it: the "separate sender" of the upgrade tests.
///
/// [`finish`]: BackgroundLoad::finish
pub struct BackgroundLoad {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<io::Result<Report>>>,
}

impl BackgroundLoad {
    /// Starts `cfg` (normally with a `rate`, and neither `count` nor `duration`) on a
    /// thread that first enters `net`, so its sockets live in the namespace.
    pub fn start(net: &crate::TestNet, cfg: LoadConfig) -> BackgroundLoad {
        BackgroundLoad::start_in(net.netns_path(), cfg)
    }

    /// [`start`](Self::start) in the network namespace at `netns` (any nsfs path, e.g.
    /// `/proc/<pid>/ns/net` of a container's PID 1).
    pub fn start_in(netns: std::path::PathBuf, cfg: LoadConfig) -> BackgroundLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("background-load".into())
            .spawn(move || {
                let ns = std::fs::File::open(&netns)?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                run_until(&cfg, &thread_stop)
            })
            .expect("spawn the background load thread");
        BackgroundLoad {
            stop,
            handle: Some(handle),
        }
    }

    /// Whether the load ended by itself (a `count`/`duration` reached, or an error).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops sending, waits for the last replies (up to the config's `grace`) and returns
    /// the report; panics if the load generator failed.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("finished once");
        match handle.join() {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => panic!("background load generator failed: {e}"),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for BackgroundLoad {
    /// Stops the thread (e.g. when a test fails half-way) so nothing keeps sending.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run_inner(cfg: &LoadConfig, external_stop: Option<&AtomicBool>) -> io::Result<Report> {
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    if cfg.payload_size < SEQ_LEN {
        return Err(invalid(
            "payload_size must be at least 8 (the sequence number)",
        ));
    }
    if cfg.senders == 0 || cfg.max_batch == 0 {
        return Err(invalid("senders and max_batch must be at least 1"));
    }
    if cfg.count.is_none() && cfg.duration.is_none() && external_stop.is_none() {
        return Err(invalid(
            "set a count or a duration: the run must be bounded",
        ));
    }
    if cfg.rate == Some(0) {
        return Err(invalid("rate must be positive (None = flat out)"));
    }
    if let Some(stamp) = &cfg.stamp {
        if stamp.values.is_empty() {
            return Err(invalid("a payload stamp needs at least one value"));
        }
        if stamp.offset < SEQ_LEN || stamp.offset.saturating_add(2) > cfg.payload_size {
            return Err(invalid(
                "a payload stamp must lie behind the sequence number and inside the payload (8 <= offset <= payload_size - 2)",
            ));
        }
    }

    let sockets = (0..cfg.senders)
        .map(|_| open_socket(cfg))
        .collect::<io::Result<Vec<_>>>()?;
    let locals = sockets
        .iter()
        .map(|s| s.local_addr())
        .collect::<io::Result<Vec<_>>>()?;
    let reserved: Vec<AtomicU64> = (0..cfg.senders).map(|_| AtomicU64::new(0)).collect();
    let unique: Vec<AtomicU64> = (0..cfg.senders).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let abort = AtomicBool::new(false);

    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let per_sender_rate = cfg.rate.map(|r| r as f64 / cfg.senders as f64);

    let (sends, recvs, send_end) = std::thread::scope(|s| {
        let mut recv_handles = Vec::new();
        for (i, sock) in sockets.iter().enumerate() {
            let (reserved, unique, stop) = (&reserved[i], &unique[i], &stop);
            recv_handles
                .push(s.spawn(move || recv_loop(sock, i, cfg, start, reserved, unique, stop)));
        }
        let mut send_handles = Vec::new();
        for (i, sock) in sockets.iter().enumerate() {
            let quota = cfg
                .count
                .map(|c| c / cfg.senders as u64 + u64::from((i as u64) < c % cfg.senders as u64));
            let (reserved, abort) = (&reserved[i], &abort);
            send_handles.push(s.spawn(move || {
                let r = send_loop(SendParams {
                    sock,
                    index: i,
                    senders: cfg.senders,
                    quota,
                    deadline,
                    rate: per_sender_rate,
                    payload_size: cfg.payload_size,
                    stamp: cfg.stamp.as_ref(),
                    max_batch: cfg.max_batch,
                    start,
                    reserved,
                    abort,
                    external_stop,
                    record_sends: cfg.record_losses,
                });
                if r.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                r
            }));
        }
        let sends: Vec<io::Result<SendOut>> = send_handles
            .into_iter()
            .map(|h| h.join().expect("sender thread panicked"))
            .collect();
        let send_end = Instant::now();
        let total_sent: u64 = sends
            .iter()
            .map(|r| r.as_ref().map(|o| o.sent).unwrap_or(0))
            .sum();
        // Stragglers: wait up to `grace`, but no longer than needed.
        let grace_end = send_end + cfg.grace;
        while Instant::now() < grace_end && !abort.load(Ordering::Relaxed) {
            let got: u64 = unique.iter().map(|u| u.load(Ordering::Relaxed)).sum();
            if got >= total_sent {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        let recvs: Vec<RecvOut> = recv_handles
            .into_iter()
            .map(|h| h.join().expect("receiver thread panicked"))
            .collect();
        (sends, recvs, send_end)
    });

    let mut report = Report::default();
    if cfg.timeline.is_some() {
        report.timeline = Some(Timeline {
            start: Some(start),
            ..Timeline::default()
        });
    }
    for (i, (send, recv)) in sends.into_iter().zip(recvs).enumerate() {
        let send = send?;
        let recv = match recv.result {
            Ok(()) => recv,
            Err(e) => return Err(e),
        };
        let mut sr = SenderReport {
            local: locals[i],
            sent: send.sent,
            received: 0,
            per_worker: BTreeMap::new(),
        };
        for &c in recv.seen.iter().take(send.sent as usize) {
            if c > 0 {
                sr.received += 1;
                report.duplicated += u64::from(c - 1);
            }
        }
        if cfg.record_losses {
            for k in 0..send.sent {
                let c = recv.seen.get(k as usize).copied().unwrap_or(0);
                let at = || start + send.sent_at_ms(k);
                if c == 0 {
                    report.lost_at.push(at());
                }
                for _ in 1..c {
                    report.duplicated_at.push(at());
                }
            }
        }
        if let (Some(rec), Some(t)) = (recv.timeline, report.timeline.as_mut()) {
            rec.merge_into(t);
        }
        for (t, n) in recv.per_socket {
            *sr.per_worker.entry((t.generation, t.worker)).or_default() += n;
            *report
                .per_worker
                .entry((t.generation, t.worker))
                .or_default() += n;
            *report.per_generation.entry(t.generation).or_default() += n;
            *report.per_socket.entry(t).or_default() += n;
        }
        report.sent += send.sent;
        report.received += sr.received;
        report.malformed += recv.malformed;
        report.refused += send.refused + recv.refused;
        report.per_sender.push(sr);
    }
    report.lost = report.sent - report.received;
    report.lost_at.sort();
    report.duplicated_at.sort();
    report.duration = send_end - start;
    report.rate = report.sent as f64 / report.duration.as_secs_f64().max(1e-9);
    Ok(report)
}

fn open_socket(cfg: &LoadConfig) -> io::Result<UdpSocket> {
    let any: IpAddr = match cfg.target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind((cfg.source.unwrap_or(any), 0))?;
    // Connected: one fixed 4-tuple per socket (the point of the single-sender tests), and
    // the kernel only hands us datagrams from the target.
    sock.connect(cfg.target)?;
    set_recv_buffer(&sock, cfg.recv_buffer);
    // The receiver wakes up this often to notice the end of the run.
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(sock)
}

/// SO_RCVBUFFORCE needs CAP_NET_ADMIN; without it (the loadgen binary run by a user)
/// fall back to SO_RCVBUF, which the kernel caps at net.core.rmem_max.
pub fn set_recv_buffer(sock: &UdpSocket, bytes: usize) {
    if setsockopt(sock, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(sock, sockopt::RcvBuf, &bytes);
    }
}

struct SendParams<'a> {
    sock: &'a UdpSocket,
    index: usize,
    senders: usize,
    quota: Option<u64>,
    deadline: Option<Instant>,
    /// Datagrams per second for this sender.
    rate: Option<f64>,
    payload_size: usize,
    stamp: Option<&'a PayloadStamp>,
    max_batch: usize,
    start: Instant,
    /// Sequence slots handed to the kernel so far (published before each send, so a
    /// reply can never carry a slot the receiver considers unsent).
    reserved: &'a AtomicU64,
    abort: &'a AtomicBool,
    /// Ends sending normally (not an error) once set.
    external_stop: Option<&'a AtomicBool>,
    /// Fill [`SendOut::sent_by_ms`].
    record_sends: bool,
}

struct SendOut {
    sent: u64,
    refused: u64,
    /// With `record_sends`: entry `m` is how many datagrams had been sent when
    /// millisecond `m` of the run began (non-decreasing).
    sent_by_ms: Vec<u64>,
}

impl SendOut {
    /// When (from the start of the run, to the millisecond) datagram `k` was sent.
    fn sent_at_ms(&self, k: u64) -> Duration {
        let m = self
            .sent_by_ms
            .partition_point(|&n| n <= k)
            .saturating_sub(1);
        Duration::from_millis(m as u64)
    }
}

fn send_loop(p: SendParams<'_>) -> io::Result<SendOut> {
    let ps = p.payload_size;
    // About 1 ms worth of datagrams per syscall: large batches at high rates (syscall
    // cost), single datagrams at low rates (smooth pacing).
    let batch = match p.rate {
        Some(r) => ((r / 1000.0).ceil() as usize).clamp(1, p.max_batch),
        None => p.max_batch,
    }
    .min(MAX_SEND_BATCH);
    // Everything the syscalls need, allocated once: the datagrams (one slot of `ps`
    // bytes each), the message headers, and "no address" for every message.
    let mut buf = vec![0x5au8; batch * ps];
    let mut headers = MultiHeaders::<()>::preallocate(batch, None);
    let no_addresses = vec![None::<()>; batch];
    let (mut sent, mut refused) = (0u64, 0u64);
    let mut sent_by_ms = Vec::new();
    loop {
        if p.abort.load(Ordering::Relaxed)
            || p.external_stop.is_some_and(|s| s.load(Ordering::Relaxed))
        {
            break;
        }
        let remaining = p.quota.map_or(u64::MAX, |q| q - sent);
        if remaining == 0 {
            break;
        }
        let now = Instant::now();
        if p.deadline.is_some_and(|d| now >= d) {
            break;
        }
        let n = (batch as u64).min(remaining) as usize;
        if let Some(r) = p.rate {
            // Token schedule: the (sent + n)-th datagram is due at start + (sent + n) / r.
            let due = p.start + Duration::from_secs_f64((sent + n as u64) as f64 / r);
            if due > now {
                let mut wake = p.deadline.map_or(due, |d| due.min(d));
                if p.external_stop.is_some() {
                    // Look at the stop flag at least every 10 ms even at low rates.
                    wake = wake.min(now + Duration::from_millis(10));
                }
                std::thread::sleep(wake.saturating_duration_since(now));
                continue;
            }
        }
        for (j, slot) in buf.chunks_exact_mut(ps).take(n).enumerate() {
            let k = sent + j as u64;
            let seq = k * p.senders as u64 + p.index as u64;
            slot[..SEQ_LEN].copy_from_slice(&seq.to_le_bytes());
            if let Some(stamp) = p.stamp {
                // run_inner checked 8 <= offset and offset + 2 <= ps: the two bytes lie
                // inside the slot, behind the sequence number.
                slot[stamp.offset..stamp.offset + 2]
                    .copy_from_slice(&stamp.value(p.index, k).to_be_bytes());
            }
        }
        p.reserved.store(sent + n as u64, Ordering::Release);
        if p.record_sends {
            let ms = p.start.elapsed().as_millis() as usize;
            if sent_by_ms.len() <= ms {
                sent_by_ms.resize(ms + 1, sent);
            }
        }
        match send_slots(p.sock, &mut headers, &buf, ps, n, &no_addresses) {
            Ok(r) => sent += r as u64,
            Err(Errno::EINTR) => {}
            // A pending ICMP port unreachable is reported on this send, which then did
            // not go out: count it and retry.
            Err(Errno::ECONNREFUSED) => refused += 1,
            Err(Errno::EAGAIN | Errno::ENOBUFS) => std::thread::sleep(Duration::from_micros(100)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(SendOut {
        sent,
        refused,
        sent_by_ms,
    })
}

/// At most this many datagrams per `sendmmsg`: the kernel's own limit (`UIO_MAXIOV`),
/// beyond which it sends only the first 1024 anyway.
const MAX_SEND_BATCH: usize = 1024;

/// One `sendmmsg` of the first `n` slots of `buf` (each `slot` bytes) on the connected
/// `sock`; returns how many went out.
///
/// The io vectors are built on the stack for each call: they borrow `buf`, which the
/// sender rewrites between calls, so they cannot be kept. That is a 16 KiB fill per
/// call and no allocation; the time goes to the system call (measured: the sender's
/// user time stays near zero, as with the raw `libc::sendmmsg` it replaces).
fn send_slots(
    sock: &UdpSocket,
    headers: &mut MultiHeaders<()>,
    buf: &[u8],
    slot: usize,
    n: usize,
    no_addresses: &[Option<()>],
) -> nix::Result<usize> {
    let mut iovs = [[IoSlice::new(&[])]; MAX_SEND_BATCH];
    for (iov, datagram) in iovs.iter_mut().zip(buf.chunks_exact(slot).take(n)) {
        *iov = [IoSlice::new(datagram)];
    }
    let no_cmsgs: [ControlMessage<'_>; 0] = [];
    let results = sendmmsg(
        sock.as_raw_fd(),
        headers,
        &iovs[..n],
        no_addresses,
        no_cmsgs,
        MsgFlags::empty(),
    )?;
    Ok(results.count())
}

struct RecvOut {
    result: io::Result<()>,
    /// Replies per slot k (seq = k * senders + index), saturating.
    seen: Vec<u8>,
    per_socket: BTreeMap<Trailer, u64>,
    malformed: u64,
    refused: u64,
    timeline: Option<TimelineRec>,
}

const RECV_BATCH: usize = 64;

fn recv_loop(
    sock: &UdpSocket,
    index: usize,
    cfg: &LoadConfig,
    start: Instant,
    reserved: &AtomicU64,
    unique: &AtomicU64,
    stop: &AtomicBool,
) -> RecvOut {
    let mut out = RecvOut {
        result: Ok(()),
        seen: Vec::new(),
        per_socket: BTreeMap::new(),
        malformed: 0,
        refused: 0,
        timeline: cfg.timeline.map(|span| TimelineRec::new(start, span)),
    };
    let (senders, payload_size) = (cfg.senders, cfg.payload_size);
    // Room for more than a valid reply, so an oversized one shows up as malformed rather
    // than being truncated into something that parses.
    let slot = payload_size + TRAILER_LEN + 64;
    let mut buf = vec![0u8; RECV_BATCH * slot];
    let mut headers = MultiHeaders::<()>::preallocate(RECV_BATCH, None);
    // (length, truncated) of each datagram of the last batch.
    let mut received = [(0usize, false); RECV_BATCH];
    while !stop.load(Ordering::Relaxed) {
        let n = match recv_slots(sock, &mut headers, &mut buf, slot, &mut received) {
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(Errno::ECONNREFUSED) => {
                out.refused += 1;
                continue;
            }
            Err(e) => {
                out.result = Err(e.into());
                break;
            }
        };
        let sent_bound = reserved.load(Ordering::Acquire);
        let bucket = out.timeline.as_ref().map_or(0, TimelineRec::bucket_now);
        for (&(len, truncated), data) in received[..n].iter().zip(buf.chunks_exact(slot)) {
            let Some((seq, trailer)) =
                parse_reply(&data[..len.min(slot)], payload_size).filter(|_| !truncated)
            else {
                out.malformed += 1;
                continue;
            };
            let k = seq / senders as u64;
            if seq % senders as u64 != index as u64 || k >= sent_bound {
                out.malformed += 1;
                continue;
            }
            let k = k as usize;
            if k >= out.seen.len() {
                out.seen.resize((k + 1).next_power_of_two().max(1024), 0);
            }
            let c = &mut out.seen[k];
            *c = c.saturating_add(1);
            if *c == 1 {
                unique.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(t) = out.timeline.as_mut() {
                t.count(bucket, trailer.generation);
            }
            *out.per_socket.entry(trailer).or_default() += 1;
        }
    }
    out
}

/// One `recvmmsg` of up to [`RECV_BATCH`] datagrams into the slots of `buf` (each `slot`
/// bytes); returns how many came and puts each one's length and `MSG_TRUNC` flag in
/// `received`. `SO_RCVTIMEO` bounds the wait for the first datagram, `MSG_WAITFORONE`
/// makes the rest non-blocking.
///
/// The io vectors are built on the stack for each call, as in [`send_slots`].
fn recv_slots(
    sock: &UdpSocket,
    headers: &mut MultiHeaders<()>,
    buf: &mut [u8],
    slot: usize,
    received: &mut [(usize, bool); RECV_BATCH],
) -> nix::Result<usize> {
    let mut slots = buf.chunks_exact_mut(slot);
    let mut iovs: [[IoSliceMut<'_>; 1]; RECV_BATCH] = std::array::from_fn(|_| {
        [IoSliceMut::new(
            slots.next().expect("buf has RECV_BATCH slots"),
        )]
    });
    let results = recvmmsg(
        sock.as_raw_fd(),
        headers,
        iovs.iter_mut(),
        MsgFlags::MSG_WAITFORONE,
        None,
    )?;
    let mut n = 0;
    for (r, m) in received.iter_mut().zip(results) {
        *r = (m.bytes, m.flags.contains(MsgFlags::MSG_TRUNC));
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_rotate_per_datagram_and_sender() {
        let one = PayloadStamp {
            offset: 8,
            values: vec![0x0102],
        };
        assert_eq!(
            (0..5).map(|k| one.value(3, k)).collect::<Vec<_>>(),
            [0x0102; 5]
        );
        let four = PayloadStamp {
            offset: 8,
            values: vec![10, 11, 12, 13],
        };
        assert_eq!(
            (0..6).map(|k| four.value(0, k)).collect::<Vec<_>>(),
            [10, 11, 12, 13, 10, 11]
        );
        assert_eq!(
            (0..4).map(|k| four.value(5, k)).collect::<Vec<_>>(),
            [11, 12, 13, 10]
        );
    }

    #[test]
    fn timeline_buckets_per_generation_and_merges() {
        let start = Instant::now();
        let mut a = TimelineRec::new(start, Duration::from_millis(30));
        assert_eq!(a.buckets, 4);
        a.count(0, 1);
        a.count(0, 1);
        a.count(2, 2);
        a.count(4, 1); // beyond the span
        let mut b = TimelineRec::new(start, Duration::from_millis(30));
        b.count(1, 2);
        for g in 10..10 + TIMELINE_GENERATIONS as u32 {
            b.count(3, g);
        }
        b.count(3, 99); // with 2 and 10..=24 the table is full: 25 and 99 are late
        let mut t = Timeline {
            start: Some(start),
            ..Timeline::default()
        };
        a.merge_into(&mut t);
        b.merge_into(&mut t);
        assert_eq!(t.per_generation[&1], [2, 0, 0, 0]);
        assert_eq!(t.per_generation[&2], [0, 1, 1, 0]);
        assert_eq!(t.per_generation[&10], [0, 0, 0, 1]);
        assert_eq!(t.len(), 4);
        assert_eq!(t.late, 3); // after the span, and two generations too many
        assert_eq!(t.secs_at(start + Duration::from_millis(500)), Some(0.5));
    }

    #[test]
    fn misplaced_stamps_are_refused_before_sending() {
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for cfg in [
            LoadConfig::new(target).count(1).stamp(4, vec![1]),
            LoadConfig::new(target).count(1).stamp(63, vec![1]),
            LoadConfig::new(target).count(1).stamp(usize::MAX, vec![1]),
            LoadConfig::new(target).count(1).stamp(8, vec![]),
        ] {
            let e = run(&cfg).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{cfg:?}");
        }
    }
}
