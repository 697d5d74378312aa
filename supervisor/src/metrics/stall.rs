//! Stalled queues: a worker that said READY=1 and reads nothing.
//!
//! Nothing else shows it: the worker lives, the selector sends it datagrams, and
//! the kernel queues them until the socket's buffer is full. So once a second the
//! receive queue (`SO_MEMINFO` rmem_alloc) of every socket of the serving
//! generation is sampled, and a socket is **stalled** when its queue was non-zero
//! on every sample for at least [`STALL_AFTER`] and never went down from one
//! sample to the next. A worker that reads at all makes its queue shrink between
//! two samples (or empty), which ends the run. A queue pinned at a full buffer
//! (the worker reads nothing, or far less than arrives) stays stalled.
//!
//! A stall is logged (a warning when it starts, rate-limited over all sockets;
//! a line when it ends), shown by `supervisor status` (per socket and per
//! generation) and exported as `supervisor_socket_stalled`.
use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use crate::{
    control::RateLimitedLog,
    sys,
    upgrade::{GenerationState, Shared, State},
};

/// How long a queue must stay non-empty without going down.
pub const STALL_AFTER: Duration = Duration::from_secs(3);
/// How often queues are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// At most one warning about new stalls per this long (the status and the metric
/// always show all of them).
const WARN_EVERY: Duration = Duration::from_secs(30);

/// A socket: generation number, listener index, socket index.
pub type SocketKey = (u32, usize, u32);

/// The sockets stalled at the last sample (read by `status::collect`).
static STALLED: LazyLock<Mutex<HashSet<SocketKey>>> = LazyLock::new(Default::default);

pub fn is_stalled(key: SocketKey) -> bool {
    STALLED.lock().map(|s| s.contains(&key)).unwrap_or(false)
}

/// One socket's current run of non-empty, non-decreasing samples.
#[derive(Debug, Clone, Copy)]
struct Run {
    since: Instant,
    last: u32,
}

/// The rule, fed one sample per socket at a time.
#[derive(Default)]
pub struct Detector {
    runs: HashMap<SocketKey, Run>,
}

impl Detector {
    /// Takes one sample; returns whether the socket is stalled now.
    pub fn sample(&mut self, key: SocketKey, queued: u32, now: Instant) -> bool {
        match self.runs.get_mut(&key) {
            Some(run) if queued > 0 && queued >= run.last => {
                run.last = queued;
                now.duration_since(run.since) >= STALL_AFTER
            }
            _ if queued > 0 => {
                self.runs.insert(
                    key,
                    Run {
                        since: now,
                        last: queued,
                    },
                );
                false
            }
            _ => {
                self.runs.remove(&key);
                false
            }
        }
    }

    /// Forgets sockets not sampled this round (their generation stopped serving).
    pub fn retain(&mut self, seen: &HashSet<SocketKey>) {
        self.runs.retain(|key, _| seen.contains(key));
    }
}

/// The queues of the serving generations' sockets, with their worker index.
fn queues(state: &State) -> Vec<(SocketKey, u32, String)> {
    let mut out = Vec::new();
    for generation in state
        .generations
        .iter()
        .filter(|g| g.state == GenerationState::Serving)
    {
        for (listener_index, listener) in generation.listeners.iter().enumerate() {
            for (index, socket) in listener.sockets.iter().enumerate() {
                let queued = sys::socket_meminfo(socket.as_fd())
                    .map(|m| m.queued_bytes)
                    .unwrap_or(0);
                let worker = index as u32 / listener.sockets_per_worker.max(1);
                out.push((
                    (generation.number, listener_index, index as u32),
                    queued,
                    format!(
                        "generation {}: listener {} socket {index} (worker {worker})",
                        generation.number, listener.name
                    ),
                ));
            }
        }
    }
    out
}

/// Samples every [`SAMPLE_EVERY`] until the task is dropped.
pub async fn watch(shared: Shared) {
    let mut detector = Detector::default();
    let mut warnings = RateLimitedLog::new(WARN_EVERY);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let samples = queues(&shared.lock().unwrap());
        let now = Instant::now();
        let seen: HashSet<SocketKey> = samples.iter().map(|(key, _, _)| *key).collect();
        detector.retain(&seen);
        let mut stalled = HashSet::new();
        let mut started = Vec::new();
        for (key, queued, name) in samples {
            if detector.sample(key, queued, now) {
                stalled.insert(key);
                if !is_stalled(key) {
                    started.push(format!("{name}, {queued} bytes queued"));
                }
            } else if is_stalled(key) {
                tracing::info!("{name}: no longer stalled (its queue went down)");
            }
        }
        if !started.is_empty()
            && let Some(suppressed) = warnings.allow()
        {
            tracing::warn!(
                "receive queue stalled: not read for {} s although non-empty: {} (the worker may be ready but not reading; {suppressed} earlier warnings not logged)",
                STALL_AFTER.as_secs(),
                started.join("; ")
            );
        }
        if let Ok(mut published) = STALLED.lock() {
            *published = stalled;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_only_after_three_seconds_of_non_decreasing_queue() {
        let mut d = Detector::default();
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        let key = (1, 0, 0);
        assert!(!d.sample(key, 100, s(0)));
        assert!(!d.sample(key, 100, s(1)));
        assert!(!d.sample(key, 200, s(2)));
        assert!(d.sample(key, 200, s(3)));
        assert!(d.sample(key, 300, s(4)));
        // It went down: the worker read something.
        assert!(!d.sample(key, 100, s(5)));
        assert!(!d.sample(key, 100, s(7)));
        assert!(d.sample(key, 100, s(8)));
        // Empty: not stalled, and the run starts over.
        assert!(!d.sample(key, 0, s(9)));
        assert!(!d.sample(key, 50, s(10)));
        assert!(!d.sample(key, 50, s(12)));
    }

    #[test]
    fn an_empty_queue_never_stalls() {
        let mut d = Detector::default();
        let t = Instant::now();
        for i in 0..10 {
            assert!(!d.sample((1, 0, 0), 0, t + Duration::from_secs(i)));
        }
    }

    #[test]
    fn forgets_sockets_no_longer_sampled() {
        let mut d = Detector::default();
        let t = Instant::now();
        d.sample((1, 0, 0), 10, t);
        d.retain(&HashSet::new());
        assert!(!d.sample((1, 0, 0), 10, t + Duration::from_secs(5)));
    }
}
