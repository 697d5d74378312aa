//! The end of a generation: drain (queues empty, then the drain signal, then
//! the workers' exit), teardown of one that failed, and retirement (sockets
//! closed, slot emptied, pins removed).
use std::time::Duration;

use tokio::sync::watch;

use super::{GenerationState, Progress, Shared};
use crate::worker::{Policy, WorkerStatus};

/// How long the queues must read empty before the drain signal goes out: a
/// datagram selected just before the flip may still be on its way into an old
/// socket on another CPU for a few microseconds, so two empty reads
/// `QUEUE_POLL` apart (thousands of times that) are enough. The whole wait is
/// the supervisor's own share of an upgrade cycle, so it is kept this short.
const QUEUE_QUIET_POLLS: u32 = 2;
const QUEUE_POLL: Duration = Duration::from_millis(5);
/// Of `drain_timeout`, what waiting for idle flows leaves (at most) for the drain
/// signal and the workers' exit.
const DRAIN_RESERVE: Duration = Duration::from_secs(5);

/// Drains and retires generation `number`, which no longer receives new datagrams.
pub(super) async fn drain(
    shared: &Shared,
    number: u32,
    drain_timeout: Duration,
    progress: &Progress,
) {
    let started = tokio::time::Instant::now();
    let deadline = started + drain_timeout;
    // Flows may hold the old generation for most of drain_timeout, but not all of
    // it: its workers still need time to empty their queues and exit.
    let reserve = (drain_timeout / 4).min(DRAIN_RESERVE);
    wait_for_affinity_idle(shared, number, deadline - reserve, progress).await;

    // 1. Let the old workers (still under Serve, restarted if they crash) empty
    //    their queues. Only then signal them: a worker that exits at once on
    //    SIGTERM loses nothing.
    let Some(queued) = wait_queues_empty(shared, number, deadline).await else {
        return;
    };
    if queued == 0 {
        progress.emit(format!("generation {number}: receive queues empty"));
    } else {
        progress.emit(format!(
            "generation {number}: drain_timeout reached with {queued} bytes still queued"
        ));
    }

    // 2. The drain signal, then wait for the workers to exit.
    let Some(statuses) = set_policy(shared, number, Policy::Drain) else {
        return;
    };
    progress.emit(format!(
        "generation {number}: drain signal sent to {} workers",
        statuses.len()
    ));
    let all_exited = all_finished(statuses.clone());
    if tokio::time::timeout_at(deadline, all_exited).await.is_err() {
        let left = statuses.iter().filter(|s| !s.borrow().finished).count();
        progress.emit(format!(
            "generation {number}: {left} workers still running at drain_timeout ({}), killing them",
            humantime::format_duration(drain_timeout)
        ));
        teardown_workers(shared, number).await;
    }
    retire(shared, number, progress);
    crate::metrics::upgrade_phase("drain", started.elapsed());
}

/// Waits until generation `number`'s receive queues read empty
/// `QUEUE_QUIET_POLLS` times in a row, or `deadline`; returns the bytes still
/// queued (0 when empty), None if the generation is gone.
async fn wait_queues_empty(
    shared: &Shared,
    number: u32,
    deadline: tokio::time::Instant,
) -> Option<u32> {
    let mut quiet = 0;
    loop {
        let queued = shared
            .lock()
            .unwrap()
            .generation(number)?
            .queues()
            .queued_bytes;
        quiet = if queued == 0 { quiet + 1 } else { 0 };
        // No sleep after the last read: the drain signal follows at once.
        if quiet >= QUEUE_QUIET_POLLS || tokio::time::Instant::now() >= deadline {
            return Some(queued);
        }
        tokio::time::sleep(QUEUE_POLL).await;
    }
}

/// With `flow` or `cookie` balance an old generation keeps its flows after the
/// flip. It is done when the selector has sent it nothing for `flow_idle` (its
/// per-slot counters stopped moving), or at the drain deadline.
async fn wait_for_affinity_idle(
    shared: &Shared,
    number: u32,
    deadline: tokio::time::Instant,
    progress: &Progress,
) {
    let selected = |shared: &Shared| -> Option<(u64, Duration)> {
        let state = shared.lock().unwrap();
        let generation = state.generation(number)?;
        if !generation.holds_slot() {
            // Retired early: its flows moved on, nothing more will reach it.
            return None;
        }
        let mut total = 0;
        let mut idle = Duration::ZERO;
        for (listener, dataplane) in generation.listeners.iter().zip(state.dataplanes.iter()) {
            if !listener.balance.has_affinity() {
                continue;
            }
            idle = idle.max(listener.flow_idle);
            for socket in 0..listener.sockets.len() as u32 {
                total += dataplane.counters(generation.slot, socket).selected;
            }
        }
        (!idle.is_zero()).then_some((total, idle))
    };
    let Some((mut last, idle)) = selected(shared) else {
        return;
    };
    let flows: u64 = {
        let state = shared.lock().unwrap();
        state
            .dataplanes
            .iter()
            .map(|d| d.live_flows().get(&number).copied().unwrap_or(0))
            .sum()
    };
    progress.emit(format!(
        "generation {number}: keeps its flows ({flows} in the flow table); draining once it has been idle for {}",
        humantime::format_duration(idle)
    ));
    let mut quiet_since = tokio::time::Instant::now();
    let poll = (idle / 10).clamp(Duration::from_millis(10), Duration::from_millis(500));
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            progress.emit(format!(
                "generation {number}: drain_timeout reached while it still had flows"
            ));
            return;
        }
        if now.duration_since(quiet_since) >= idle {
            progress.emit(format!(
                "generation {number}: idle for {}, no flows left",
                humantime::format_duration(idle)
            ));
            return;
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
        let Some((current, _)) = selected(shared) else {
            return;
        };
        if current != last {
            last = current;
            quiet_since = tokio::time::Instant::now();
        }
    }
}

/// Sets `policy` on every worker of generation `number`; returns their statuses
/// to wait on, or None if the generation is gone.
fn set_policy(
    shared: &Shared,
    number: u32,
    policy: Policy,
) -> Option<Vec<watch::Receiver<WorkerStatus>>> {
    let state = shared.lock().unwrap();
    let generation = state.generation(number)?;
    for worker in &generation.workers {
        worker.set_policy(policy);
    }
    Some(
        generation
            .workers
            .iter()
            .map(|w| w.status.clone())
            .collect(),
    )
}

/// Resolves when every one of these worker slots has finished.
async fn all_finished(statuses: Vec<watch::Receiver<WorkerStatus>>) {
    for mut status in statuses {
        let _ = status.wait_for(|s| s.finished).await;
    }
}

/// Kills a generation's workers and waits until they are gone.
async fn teardown_workers(shared: &Shared, number: u32) {
    if let Some(statuses) = set_policy(shared, number, Policy::Kill) {
        all_finished(statuses).await;
    }
}

/// Resolves once none of `generations` is alive any more (`--wait drained`).
pub async fn wait_drained(shared: &Shared, generations: &[u32]) {
    let mut retired = shared.lock().unwrap().retired.subscribe();
    loop {
        {
            let state = shared.lock().unwrap();
            if !generations.iter().any(|&n| state.generation(n).is_some()) {
                return;
            }
        }
        if retired.changed().await.is_err() {
            return;
        }
    }
}

/// Removes a failed new generation; the serving one is not touched.
pub(super) async fn teardown(shared: &Shared, number: u32, progress: &Progress) {
    if let Some(generation) = shared
        .lock()
        .unwrap()
        .generations
        .iter_mut()
        .find(|g| g.number == number)
    {
        generation.state = GenerationState::Failed;
    }
    teardown_workers(shared, number).await;
    retire(shared, number, progress);
    progress.emit(format!("generation {number}: torn down"));
}

/// Closes a generation's sockets and unpins its arrays. Reports anything that was
/// still queued: with the workers gone nobody can read it.
pub(super) fn retire(shared: &Shared, number: u32, progress: &Progress) {
    let mut state = shared.lock().unwrap();
    let Some(position) = state.generations.iter().position(|g| g.number == number) else {
        return;
    };
    let generation = state.generations.remove(position);
    let left = generation.queues();
    if left.queued_bytes > 0 {
        progress.emit(format!(
            "generation {number}: {} bytes were left unread in its sockets when they closed",
            left.queued_bytes
        ));
    }
    // The `gen-N` pins go when `generation` (its `GenerationArray`s) is dropped below.
    // Every listener that got as far as installing its array (all of them, unless
    // the generation failed while it was being built).
    for dataplane in state.dataplanes.iter().take(generation.listeners.len()) {
        // Only once the generation is out of the control word (it always is here:
        // retired generations were flipped away from, failed ones never flipped to).
        if generation.holds_slot() && dataplane.working().generation != number {
            dataplane.clear_slot(generation.slot);
        }
    }
    let was_draining = generation.state == GenerationState::Draining;
    let cookies: Vec<u64> = generation
        .listeners
        .iter()
        .flat_map(|l| l.sockets.iter())
        .filter_map(|s| crate::sys::socket_cookie(std::os::fd::AsFd::as_fd(s)).ok())
        .collect();
    crate::fdstore::remove(&cookies);
    drop(generation);
    state.workers.journal.mark();
    state.drains.remove(&number);
    state.retired.send_modify(|count| *count += 1);
    if was_draining {
        progress.emit(format!("generation {number}: drained and removed"));
    }
}

/// Stops every generation: the drain signal to all workers once their queues
/// are read, SIGKILL at the timeout, then sockets closed and arrays unpinned.
pub async fn stop_all(shared: &Shared, drain_timeout: Duration, progress: &Progress) {
    let numbers: Vec<(u32, Policy)> = {
        let mut state = shared.lock().unwrap();
        // The drains under way give way to this one, which covers every generation.
        for (_, task) in state.drains.drain() {
            task.abort();
        }
        state
            .generations
            .iter()
            .map(|g| {
                let policy = if g.state == GenerationState::Starting {
                    Policy::Kill
                } else {
                    Policy::Drain
                };
                (g.number, policy)
            })
            .collect()
    };
    // As in `drain`: the drain signal only once what is queued has been read, so
    // workers that exit at once on it lose nothing; some of drain_timeout is kept
    // for their exit.
    let deadline = tokio::time::Instant::now() + drain_timeout;
    let reserve = (drain_timeout / 4).min(DRAIN_RESERVE);
    let mut statuses = Vec::new();
    for &(number, policy) in &numbers {
        if policy == Policy::Drain
            && let Some(queued) = wait_queues_empty(shared, number, deadline - reserve).await
            && queued > 0
        {
            progress.emit(format!(
                "generation {number}: {queued} bytes still queued when the drain signal goes out"
            ));
        }
        statuses.extend(set_policy(shared, number, policy).into_iter().flatten());
    }
    if tokio::time::timeout_at(deadline, all_finished(statuses))
        .await
        .is_err()
    {
        progress.emit("workers still running at drain_timeout, killing them");
    }
    for (number, _) in numbers {
        teardown_workers(shared, number).await;
        retire(shared, number, progress);
    }
}
