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
use std::{
    os::fd::{AsFd, OwnedFd, RawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::{io::unix::AsyncFd, sync::watch};

use crate::{
    config::ReadyMode,
    notify::Registry,
    sys::{self, PreparedExec},
};

/// What every worker of a generation is exec'd with.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Resolved path of `command[0]`.
    pub program: String,
    pub argv: Vec<String>,
    /// The supervisor's environment minus what belongs to the supervisor itself.
    pub inherited_env: Vec<(String, String)>,
    pub notify_socket: String,
    pub credentials: Option<(u32, u32)>,
    pub ready: ReadyMode,
    pub drain_signal: Signal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Start,
    Serve,
    Drain,
    Kill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerPhase {
    Starting,
    Ready,
    Restarting,
    Draining,
    Exited,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub pid: Option<i32>,
    pub state: WorkerPhase,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// The worker's own `STATUS=` line.
    pub status: Option<String>,
    /// Why the slot failed while its generation was starting.
    #[serde(skip)]
    pub failure: Option<String>,
    #[serde(skip)]
    pub finished: bool,
}

pub struct WorkerSlot {
    pub index: u32,
    pub status: watch::Receiver<WorkerStatus>,
    policy: watch::Sender<Policy>,
}

/// What the slot hands to its worker: sockets (the supervisor's own fds, dup'd to
/// 3.. in the child) and their `LISTEN_FDNAMES`.
pub struct SlotSockets {
    pub fds: Vec<RawFd>,
    pub names: Vec<String>,
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
        registry: Registry,
    ) -> WorkerSlot {
        let task = SlotTask {
            generation,
            index,
            spec,
            sockets,
            registry,
            adopted: None,
        };
        WorkerSlot::spawn(task, WorkerPhase::Starting, 0, Policy::Start)
    }

    /// Takes over a worker that a previous supervisor image (before a re-exec)
    /// started: it is still our child, serving, and ready. `pid: None` means it
    /// was between restarts: start it again.
    pub fn adopt(
        generation: u32,
        index: u32,
        spec: Arc<WorkerSpec>,
        sockets: SlotSockets,
        registry: Registry,
        pid: Option<i32>,
        restarts: u32,
    ) -> WorkerSlot {
        let task = SlotTask {
            generation,
            index,
            spec,
            sockets,
            registry,
            adopted: pid,
        };
        WorkerSlot::spawn(task, WorkerPhase::Ready, restarts, Policy::Serve)
    }

    fn spawn(task: SlotTask, state: WorkerPhase, restarts: u32, policy: Policy) -> WorkerSlot {
        let index = task.index;
        let (status_tx, status_rx) = watch::channel(WorkerStatus {
            pid: task.adopted,
            state,
            restarts,
            last_exit: None,
            status: None,
            failure: None,
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
    registry: Registry,
    /// A worker that is already running (taken over after a re-exec).
    adopted: Option<i32>,
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
        registry,
        mut adopted,
    } = task;
    let mut env = spec.inherited_env.clone();
    env.extend([
        ("LISTEN_FDS".into(), sockets.fds.len().to_string()),
        ("LISTEN_FDNAMES".into(), sockets.names.join(":")),
        ("NOTIFY_SOCKET".into(), spec.notify_socket.clone()),
        ("SUPERVISOR_GENERATION".into(), generation.to_string()),
        ("SUPERVISOR_WORKER".into(), index.to_string()),
        // Beyond the contract, for workers that make the drain signal configurable
        // (the examples and the SDK read it).
        (
            "SUPERVISOR_DRAIN_SIGNAL".into(),
            spec.drain_signal.as_str().to_string(),
        ),
        (
            "SUPERVISOR_COOKIES".into(),
            sockets
                .cookies
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(":"),
        ),
    ]);
    let finish = |failure: Option<String>| {
        status.send_modify(|s| {
            s.finished = true;
            s.pid = None;
            s.state = WorkerPhase::Exited;
            if failure.is_some() {
                s.failure = failure;
            }
        });
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        if matches!(*policy.borrow(), Policy::Drain | Policy::Kill) {
            return finish(None);
        }
        let was_adopted = adopted.is_some();
        let spawned = match adopted.take() {
            // Still our child after the re-exec, so its pidfd is as good as one
            // from fork (and waitid still reaps it).
            Some(pid) => sys::pidfd_open(pid).map(|pidfd| sys::Spawned { pid, pidfd }),
            None => PreparedExec::new(
                &spec.program,
                &spec.argv,
                &env,
                true,
                sockets.fds.clone(),
                spec.credentials,
            )
            .and_then(|mut prepared| sys::spawn_worker(&mut prepared)),
        };
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                let why = format!("cannot exec worker {index} ({}): {e}", spec.program);
                tracing::error!("generation {generation}: {why}");
                if *policy.borrow() == Policy::Start {
                    return finish(Some(why));
                }
                status.send_modify(|s| {
                    s.state = WorkerPhase::Restarting;
                    s.last_exit = Some(why);
                });
                if !sleep_unless_stopped(&mut policy, backoff).await {
                    return finish(None);
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let pid = spawned.pid;
        // Registered before the next await: on this single-threaded runtime the
        // notify reader cannot run in between, so no READY=1 can be missed.
        let mut messages = registry.register(pid);
        let exec_ready = spec.ready == ReadyMode::Exec;
        status.send_modify(|s| {
            s.pid = Some(pid);
            // An adopted worker keeps the Ready it had.
            if !was_adopted {
                s.state = if exec_ready {
                    WorkerPhase::Ready
                } else {
                    WorkerPhase::Starting
                };
            }
        });
        tracing::info!("generation {generation}: worker {index} started, pid {pid}");
        let started = Instant::now();
        let pidfd = match sys::register_async(spawned.pidfd) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!("watching worker {pid}: {e}");
                return finish(Some(format!("cannot watch worker {index}: {e}")));
            }
        };
        // If Drain/Kill was set before we got here, act on it now.
        let mut acted_on: Option<Policy> = None;
        let exit = loop {
            let current = *policy.borrow_and_update();
            if acted_on != Some(current) {
                match current {
                    Policy::Drain => {
                        signal(&pidfd, spec.drain_signal as i32);
                        status.send_modify(|s| s.state = WorkerPhase::Draining);
                    }
                    Policy::Kill => signal(&pidfd, libc::SIGKILL),
                    Policy::Start | Policy::Serve => {}
                }
                acted_on = Some(current);
            }
            tokio::select! {
                guard = pidfd.readable() => {
                    let mut guard = match guard {
                        Ok(guard) => guard,
                        Err(e) => { tracing::error!("pidfd: {e}"); continue; }
                    };
                    match sys::pidfd_try_wait(pidfd.get_ref().as_fd()) {
                        Ok(Some(exit)) => break exit,
                        Ok(None) => guard.clear_ready(),
                        Err(e) => { tracing::error!("waitid: {e}"); guard.clear_ready(); }
                    }
                }
                Some(message) = messages.recv() => {
                    status.send_modify(|s| {
                        if message.ready && s.state == WorkerPhase::Starting {
                            s.state = WorkerPhase::Ready;
                        }
                        if let Some(text) = message.status {
                            s.status = Some(text);
                        }
                    });
                }
                changed = policy.changed() => {
                    if changed.is_err() {
                        // The generation is gone without a Drain/Kill: kill.
                        signal(&pidfd, libc::SIGKILL);
                    }
                }
            }
        };
        registry.unregister(pid);
        let exit_text = exit.to_string();
        status.send_modify(|s| {
            s.pid = None;
            s.last_exit = Some(exit_text.clone());
        });
        let current_policy = *policy.borrow();
        match current_policy {
            Policy::Start => {
                let why = format!("worker {index} (pid {pid}) {exit_text} before it was ready");
                tracing::error!("generation {generation}: {why}");
                return finish(Some(why));
            }
            Policy::Drain | Policy::Kill => {
                tracing::info!("generation {generation}: worker {index} (pid {pid}) {exit_text}");
                return finish(None);
            }
            Policy::Serve => {
                if started.elapsed() > STABLE_RUN {
                    backoff = FIRST_BACKOFF;
                }
                tracing::warn!(
                    "generation {generation}: worker {index} (pid {pid}) {exit_text}; restarting in {backoff:?} on the same sockets"
                );
                status.send_modify(|s| {
                    s.state = WorkerPhase::Restarting;
                    s.restarts += 1;
                });
                if !sleep_unless_stopped(&mut policy, backoff).await {
                    return finish(None);
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn signal(pidfd: &AsyncFd<OwnedFd>, signal: i32) {
    if let Err(e) = sys::pidfd_signal(pidfd.get_ref().as_fd(), signal) {
        tracing::error!("sending signal {signal}: {e}");
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
