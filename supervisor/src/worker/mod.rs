//! One worker slot: a task that execs the worker for slot `i` of a generation,
//! watches it (pidfd), routes its notify messages, and follows a [`Policy`] set by
//! the upgrade state machine:
//!
//! - `Start`: the generation is not serving yet. An exit is fatal to the
//!   generation (it is reported, never restarted).
//! - `Serve`: the generation serves (or drains, but its queues are not empty yet).
//!   An exit is a crash: the worker is exec'd again on the same sockets, with
//!   exponential backoff, so whatever the kernel queued meanwhile is still served.
//! - `Drain`: send the drain signal once; the next exit ends the slot.
//! - `Kill`: SIGKILL; the next exit ends the slot.
mod spec;

use std::{
    os::fd::{OwnedFd, RawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use spec::{WorkerSpec, resolve_program};

use crate::{
    config::{Handoff, ReadyMode},
    handoff::{BindHandoff, Book},
    journal::Journal,
    notify::Registry,
    process::{ExecRequest, Launcher, Process},
};
use spec::worker_env;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Start,
    Serve,
    Drain,
    Kill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerPhase {
    Starting,
    Ready,
    Restarting,
    Draining,
    Exited,
}

impl WorkerPhase {
    /// The name `status` shows (the same as in its JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerPhase::Starting => "starting",
            WorkerPhase::Ready => "ready",
            WorkerPhase::Restarting => "restarting",
            WorkerPhase::Draining => "draining",
            WorkerPhase::Exited => "exited",
        }
    }
}

impl std::fmt::Display for WorkerPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub pid: Option<i32>,
    pub state: WorkerPhase,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// The worker's own `STATUS=` line.
    pub status: Option<String>,
    /// `procfs::start_time` of `pid`: with it, the pid names this process only
    /// (recorded in the state file, checked by whoever adopts the worker).
    #[serde(skip)]
    pub start_time: Option<u64>,
    /// Why the slot failed while its generation was starting.
    #[serde(skip)]
    pub failure: Option<String>,
    /// With `handoff = "bind"`: what the worker has not bound yet (it is not
    /// ready before it has), for the ready-timeout message.
    #[serde(skip)]
    pub waiting_for: Option<String>,
    #[serde(skip)]
    pub finished: bool,
}

pub struct WorkerSlot {
    pub index: u32,
    pub status: watch::Receiver<WorkerStatus>,
    policy: watch::Sender<Policy>,
}

/// What a slot needs from its surroundings: how to start processes, and where
/// their notify messages arrive.
#[derive(Clone)]
pub struct SlotContext {
    pub launcher: Arc<dyn Launcher>,
    pub registry: Registry,
    /// Told whenever a worker starts or ends, so the state file follows.
    pub journal: Journal,
}

/// A worker found running (or not) when a supervisor takes a generation over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptedWorker {
    /// Running: take it. `drain_signalled`: it already got the drain signal.
    Running {
        pid: i32,
        start_time: Option<u64>,
        drain_signalled: bool,
    },
    /// Not running, its sockets are at hand: start it again.
    Restart,
    /// Not running and not to be started again (its sockets are gone, or its
    /// generation drains): the slot is finished.
    Gone,
}

/// What the slot hands to its worker: sockets (the supervisor's own fds, dup'd to
/// 3.. in the child) and their `LISTEN_FDNAMES`.
pub struct SlotSockets {
    pub fds: Vec<RawFd>,
    pub names: Vec<String>,
    /// The listener address of each socket (for `handoff = "bind"`).
    pub addresses: Vec<std::net::SocketAddr>,
    /// The selector cookie of each socket (see `supervisor_common::cookie`).
    pub cookies: Vec<u16>,
    /// Keeps the fds above open for as long as the slot task can exec.
    pub owner: Vec<Arc<Vec<OwnedFd>>>,
}

impl WorkerSlot {
    pub fn start(
        generation: u32,
        index: u32,
        spec: Arc<WorkerSpec>,
        sockets: SlotSockets,
        context: SlotContext,
    ) -> WorkerSlot {
        let task = SlotTask {
            generation,
            index,
            spec,
            sockets,
            context,
            adopted: None,
        };
        WorkerSlot::spawn(task, WorkerPhase::Starting, 0, Policy::Start)
    }

    /// Takes over a worker of a generation that serves or drains, started by a
    /// previous image (a re-exec) or a previous supervisor (one that died).
    pub fn adopt(
        generation: u32,
        index: u32,
        spec: Arc<WorkerSpec>,
        sockets: SlotSockets,
        context: SlotContext,
        adopted: AdoptedWorker,
        restarts: u32,
    ) -> WorkerSlot {
        let task = SlotTask {
            generation,
            index,
            spec,
            sockets,
            context,
            adopted: Some(adopted),
        };
        let (state, policy) = match adopted {
            AdoptedWorker::Running {
                drain_signalled: true,
                ..
            } => (WorkerPhase::Draining, Policy::Drain),
            AdoptedWorker::Gone => (WorkerPhase::Exited, Policy::Kill),
            _ => (WorkerPhase::Ready, Policy::Serve),
        };
        WorkerSlot::spawn(task, state, restarts, policy)
    }

    fn spawn(task: SlotTask, state: WorkerPhase, restarts: u32, policy: Policy) -> WorkerSlot {
        let index = task.index;
        let (pid, start_time) = match task.adopted {
            Some(AdoptedWorker::Running {
                pid, start_time, ..
            }) => (Some(pid), start_time),
            _ => (None, None),
        };
        let (status_tx, status_rx) = watch::channel(WorkerStatus {
            pid,
            start_time,
            state,
            restarts,
            last_exit: None,
            status: None,
            failure: None,
            waiting_for: None,
            finished: false,
        });
        let (policy_tx, policy_rx) = watch::channel(policy);
        // The task ends on its own (its worker exited under Drain/Kill, or failed
        // while starting) and says so with `WorkerStatus::finished`.
        tokio::spawn(run_slot(task, status_tx, policy_rx));
        WorkerSlot {
            index,
            status: status_rx,
            policy: policy_tx,
        }
    }

    pub fn set_policy(&self, policy: Policy) {
        self.policy.send_replace(policy);
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A worker that ran this long before crashing starts the backoff over.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// What a slot's task is started with (its channels are made in `WorkerSlot::spawn`).
struct SlotTask {
    generation: u32,
    index: u32,
    spec: Arc<WorkerSpec>,
    sockets: SlotSockets,
    context: SlotContext,
    /// A worker taken over rather than started (see [`AdoptedWorker`]).
    adopted: Option<AdoptedWorker>,
}

async fn run_slot(
    task: SlotTask,
    status: watch::Sender<WorkerStatus>,
    mut policy: watch::Receiver<Policy>,
) {
    let SlotTask {
        generation,
        index,
        spec,
        sockets,
        context,
        mut adopted,
    } = task;
    let env = worker_env(&spec, &sockets, generation, index);
    let journal = context.journal.clone();
    let finish = |failure: Option<String>| {
        journal.mark();
        status.send_modify(|s| {
            s.finished = true;
            s.pid = None;
            s.start_time = None;
            s.state = WorkerPhase::Exited;
            if failure.is_some() {
                s.failure = failure;
            }
        });
    };
    // What each new process of this slot may bind (`handoff = "bind"`).
    let bind_book = match spec.handoff {
        Handoff::ListenFds => None,
        Handoff::Bind => match Book::new(&sockets) {
            Ok(book) => Some(book),
            Err(e) => return finish(Some(format!("worker {index}: its sockets: {e}"))),
        },
    };
    let mut backoff = FIRST_BACKOFF;
    // An adopted worker that already got the drain signal must not get it twice.
    let mut drain_signalled = false;
    loop {
        let running = match adopted.take() {
            Some(AdoptedWorker::Gone) => return finish(None),
            Some(AdoptedWorker::Running {
                pid,
                start_time,
                drain_signalled: signalled,
            }) => {
                drain_signalled = signalled;
                Some((pid, start_time))
            }
            Some(AdoptedWorker::Restart) | None => None,
        };
        if running.is_none() && matches!(*policy.borrow(), Policy::Drain | Policy::Kill) {
            return finish(None);
        }
        let was_adopted = running.is_some();
        let spawned = match running {
            Some((pid, start_time)) => context.launcher.adopt(pid, start_time),
            None => context.launcher.spawn(&ExecRequest {
                program: &spec.program,
                argv: &spec.argv,
                env: &env,
                // Bind mode: the worker binds its own and is given ours then.
                fds: if bind_book.is_some() {
                    &[]
                } else {
                    &sockets.fds
                },
                credentials: spec.credentials,
                no_new_privs: spec.no_new_privs,
                bind_filter: bind_book.is_some(),
            }),
        };
        let mut process = match spawned {
            Ok(process) => process,
            Err(e) => {
                let why = format!("cannot exec worker {index} ({}): {e}", spec.program);
                tracing::error!(generation, worker = index, "generation {generation}: {why}");
                if *policy.borrow() == Policy::Start {
                    return finish(Some(why));
                }
                status.send_modify(|s| {
                    s.state = WorkerPhase::Restarting;
                    s.last_exit = Some(why);
                });
                crate::metrics::worker_restart("exec_failed");
                if !sleep_unless_stopped(&mut policy, backoff).await {
                    return finish(None);
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let pid = process.pid();
        // Started before the next await: the worker's first bind() waits for it.
        let mut handoff = match (process.take_bind_listener(), &bind_book) {
            (Some(listener), Some(book)) => match BindHandoff::start(listener, pid, book.clone()) {
                Ok(handoff) => Some(handoff),
                Err(e) => {
                    let _ = process.signal(libc::SIGKILL);
                    let _ = process.exited().await;
                    return finish(Some(format!(
                        "worker {index} (pid {pid}): serving its bind() calls: {e}"
                    )));
                }
            },
            _ => None,
        };
        // Registered before the next await: on this single-threaded runtime the
        // notify reader cannot run in between, so no READY=1 can be missed.
        let mut messages = context.registry.register(pid);
        let exec_ready = spec.ready == ReadyMode::Exec;
        // Read while the pid cannot be reused: our unreaped child, or a process
        // whose pidfd the launcher holds and whose start time it checked.
        let start_time = crate::procfs::start_time(pid);
        status.send_modify(|s| {
            s.pid = Some(pid);
            s.start_time = start_time;
            // An adopted worker keeps the Ready it had.
            if !was_adopted {
                s.state = if exec_ready && handoff.is_none() {
                    WorkerPhase::Ready
                } else {
                    WorkerPhase::Starting
                };
            }
        });
        tracing::info!(
            generation,
            worker = index,
            worker_pid = pid,
            "generation {generation}: worker {index} started, pid {pid}"
        );
        let started = Instant::now();
        journal.mark();
        let already = drain_signalled.then_some(Policy::Drain);
        drain_signalled = false;
        let exit = watch_process(
            process.as_mut(),
            Reporting {
                spec: &spec,
                status: &status,
                journal: &journal,
            },
            &mut policy,
            &mut messages,
            already,
            handoff.as_mut(),
        )
        .await;
        drop(handoff);
        context.registry.unregister(pid);
        let restart_reason = match &exit {
            Ok(crate::process::ExitStatus::Signaled(_)) => "signaled",
            _ => "exited",
        };
        let exit_text = match exit {
            Ok(exit) => exit.to_string(),
            Err(e) => {
                tracing::error!(
                    generation,
                    worker = index,
                    worker_pid = pid,
                    "watching worker {pid}: {e}"
                );
                return finish(Some(format!("cannot watch worker {index}: {e}")));
            }
        };
        status.send_modify(|s| {
            s.pid = None;
            s.start_time = None;
            s.last_exit = Some(exit_text.clone());
        });
        journal.mark();
        let current_policy = *policy.borrow();
        match current_policy {
            Policy::Start => {
                let why = format!("worker {index} (pid {pid}) {exit_text} before it was ready");
                tracing::error!(
                    generation,
                    worker = index,
                    worker_pid = pid,
                    "generation {generation}: {why}"
                );
                return finish(Some(why));
            }
            Policy::Drain | Policy::Kill => {
                tracing::info!(
                    generation,
                    worker = index,
                    worker_pid = pid,
                    "generation {generation}: worker {index} (pid {pid}) {exit_text}"
                );
                return finish(None);
            }
            Policy::Serve => {
                if started.elapsed() > STABLE_RUN {
                    backoff = FIRST_BACKOFF;
                }
                tracing::warn!(
                    generation,
                    worker = index,
                    worker_pid = pid,
                    "generation {generation}: worker {index} (pid {pid}) {exit_text}; restarting in {backoff:?} on the same sockets"
                );
                status.send_modify(|s| {
                    s.state = WorkerPhase::Restarting;
                    s.restarts += 1;
                });
                crate::metrics::worker_restart(restart_reason);
                if !sleep_unless_stopped(&mut policy, backoff).await {
                    return finish(None);
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// What a watched worker's slot reports to: its spec (the drain signal, the
/// ready mode), its status, and the state file.
struct Reporting<'a> {
    spec: &'a WorkerSpec,
    status: &'a watch::Sender<WorkerStatus>,
    journal: &'a Journal,
}

/// Follows one running worker until it exits: acts once on each policy it is
/// given (the drain signal, SIGKILL), and routes its notify messages into `status`.
async fn watch_process(
    process: &mut dyn Process,
    reporting: Reporting<'_>,
    policy: &mut watch::Receiver<Policy>,
    messages: &mut crate::notify::Inbox,
    already: Option<Policy>,
    mut handoff: Option<&mut BindHandoff>,
) -> std::io::Result<crate::process::ExitStatus> {
    let Reporting {
        spec,
        status,
        journal,
    } = reporting;
    let signal = |process: &dyn Process, signal: i32| {
        if let Err(e) = process.signal(signal) {
            tracing::error!("sending signal {signal} to pid {}: {e}", process.pid());
        }
    };
    // If Drain/Kill was set before we got here, act on it now (unless a previous
    // supervisor already did: `already`).
    let mut acted_on: Option<Policy> = already;
    // Once the slot's owner is gone (its `WorkerSlot` dropped without a Drain or
    // Kill), the worker gets one SIGKILL and the policy is not watched any more:
    // a closed channel would otherwise be "changed" on every turn of the loop.
    let mut orphaned = false;
    // Ready takes what the ready mode waits for and, in bind mode, every socket
    // bound (the selector steers traffic to all of them).
    let mut said_ready = spec.ready == ReadyMode::Exec;
    let mut unbound = handoff.as_ref().and_then(|h| h.progress.borrow().clone());
    let become_ready = |said_ready: bool, unbound: &Option<String>| {
        status.send_if_modified(|s| {
            let mut changed = false;
            if s.waiting_for != *unbound {
                s.waiting_for = unbound.clone();
                changed = true;
            }
            if said_ready && unbound.is_none() && s.state == WorkerPhase::Starting {
                s.state = WorkerPhase::Ready;
                changed = true;
            }
            changed
        });
    };
    become_ready(said_ready, &unbound);
    loop {
        let current = *policy.borrow_and_update();
        if acted_on != Some(current) {
            match current {
                Policy::Drain => {
                    signal(process, spec.drain_signal as i32);
                    status.send_modify(|s| s.state = WorkerPhase::Draining);
                    // Recorded, so a supervisor that takes over does not signal twice.
                    journal.mark();
                }
                Policy::Kill => signal(process, libc::SIGKILL),
                Policy::Start | Policy::Serve => {}
            }
            acted_on = Some(current);
        }
        let pid = process.pid();
        let bound = async {
            match handoff.as_mut() {
                Some(h) => match h.progress.changed().await {
                    Ok(()) => h.progress.borrow_and_update().clone(),
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            exit = process.exited() => return exit,
            now = bound => {
                unbound = now;
                become_ready(said_ready, &unbound);
            }
            // The merge of everything the worker said since the last turn (not a
            // queue: a flooding worker costs one state, see `notify`).
            said = messages.changed() => {
                said_ready |= said.ready;
                become_ready(said_ready, &unbound);
                status.send_if_modified(|s| {
                    let mut changed = false;
                    if said.status.is_some() && s.status != said.status {
                        s.status = said.status;
                        changed = true;
                    }
                    changed
                });
            }
            changed = policy.changed(), if !orphaned => {
                if changed.is_err() {
                    tracing::warn!("worker {pid}: its generation is gone; killing it");
                    orphaned = true;
                    if acted_on != Some(Policy::Kill) {
                        signal(process, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

/// Sleeps for `delay`; returns false early if the policy becomes Drain or Kill.
async fn sleep_unless_stopped(policy: &mut watch::Receiver<Policy>, delay: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + delay;
    loop {
        if matches!(*policy.borrow_and_update(), Policy::Drain | Policy::Kill) {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return true,
            changed = policy.changed() => if changed.is_err() { return false; },
        }
    }
}
