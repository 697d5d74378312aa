//! When is a new generation ready? When every one of its workers is, by the
//! configured `ready` mode:
//!
//! - `notify`: the worker sent `READY=1` (its slot moves it to `Ready`);
//! - `exec`: the worker was exec'd;
//! - `probe`: the worker answered `probe_payload`, sent from a socket of the
//!   supervisor's to the first listener. While probes are under way the selector
//!   steers each probe socket's datagrams (`PROBES`, keyed by source port and
//!   address) to its worker's first socket, which receives nothing else yet. An
//!   answer is delivered like a `READY=1` from that worker.
//!
//! A worker that fails to start or exits fails the generation at once, and so does
//! a probe that cannot be set up; otherwise the generation has `ready_timeout`.
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::Poll,
    time::Duration,
};

use anyhow::{Result, bail};
use tokio::{sync::mpsc, sync::watch, task::JoinHandle};

use crate::{
    config::{Config, ReadyMode},
    notify::NotifyMessage,
    upgrade::{Progress, Shared},
    worker::{WorkerPhase, WorkerStatus},
};

/// How often a probe is sent again until it is answered.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Waits until every worker of generation `number` is ready (see the module docs).
pub async fn wait(
    shared: &Shared,
    number: u32,
    config: &Config,
    progress: &Progress,
) -> Result<()> {
    let mode = config.service.ready;
    let timeout = config.service.ready_timeout;
    let mut probes =
        (mode == ReadyMode::Probe).then(|| Probes::start(shared, number, config, progress));
    let result = wait_for_workers(shared, number, mode, timeout, probes.as_mut(), progress).await;
    if let Some(probes) = probes {
        probes.stop(shared);
    }
    result
}

async fn wait_for_workers(
    shared: &Shared,
    number: u32,
    mode: ReadyMode,
    timeout: Duration,
    mut probes: Option<&mut Probes>,
    progress: &Progress,
) -> Result<()> {
    let mut statuses: Vec<(u32, watch::Receiver<WorkerStatus>)> = {
        let state = shared.lock().unwrap();
        let Some(generation) = state.generation(number) else {
            bail!("generation {number} vanished before it was ready");
        };
        generation
            .workers
            .iter()
            .map(|w| (w.index, w.status.clone()))
            .collect()
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut announced_pid = vec![None; statuses.len()];
    let mut announced_ready = vec![false; statuses.len()];
    loop {
        let mut all_ready = true;
        for (i, (index, status)) in statuses.iter_mut().enumerate() {
            let s = status.borrow_and_update().clone();
            if let Some(why) = s.failure {
                bail!("{why}");
            }
            if s.finished {
                // Told to stop (a supervisor shutdown) before it was ready.
                bail!("worker {index} was stopped before it was ready");
            }
            if let Some(pid) = s.pid
                && announced_pid[i] != s.pid
            {
                announced_pid[i] = s.pid;
                progress.emit(format!(
                    "generation {number}: worker {index} spawned, pid {pid}"
                ));
            }
            if s.state == WorkerPhase::Ready {
                if !announced_ready[i] {
                    announced_ready[i] = true;
                    progress.emit(format!("generation {number}: worker {index} ready"));
                }
            } else {
                all_ready = false;
            }
        }
        if all_ready {
            progress.emit(format!(
                "generation {number}: all {} workers ready",
                statuses.len()
            ));
            return Ok(());
        }
        let probe_failed = async {
            match probes.as_mut() {
                Some(probes) => probes.failures.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = any_changed(&mut statuses) => {}
            Some(why) = probe_failed => bail!("readiness probe: {why}"),
            _ = tokio::time::sleep_until(deadline) => {
                let waiting: Vec<String> = statuses
                    .iter()
                    .filter(|(_, s)| s.borrow().state != WorkerPhase::Ready)
                    .map(|(index, s)| {
                        let s = s.borrow();
                        match s.pid {
                            Some(pid) => format!("worker {index} (pid {pid})"),
                            None => format!("worker {index}"),
                        }
                    })
                    .collect();
                // handoff = "bind": which listener a worker never bound.
                let unbound: Vec<String> = statuses
                    .iter()
                    .filter_map(|(index, s)| {
                        let s = s.borrow();
                        let what = s.waiting_for.as_ref()?;
                        Some(match s.pid {
                            Some(pid) => format!("worker {index} (pid {pid}) {what}"),
                            None => format!("worker {index} {what}"),
                        })
                    })
                    .collect();
                if !unbound.is_empty() {
                    bail!(
                        "{} within ready_timeout ({}); with handoff = \"bind\" a worker is ready only once it has bound each listener's address (sockets_per_worker times)",
                        unbound.join("; "),
                        humantime::format_duration(timeout),
                    );
                }
                bail!(
                    "{} not ready within ready_timeout ({}); {}",
                    waiting.join(", "),
                    humantime::format_duration(timeout),
                    what_ready_means(mode)
                );
            }
        }
    }
}

/// The hint in a ready-timeout message: what the configured mode waits for.
fn what_ready_means(mode: ReadyMode) -> &'static str {
    match mode {
        ReadyMode::Notify => "with ready = \"notify\" a worker must send READY=1 to $NOTIFY_SOCKET",
        ReadyMode::Probe => {
            "with ready = \"probe\" a worker must answer probe_payload on its first socket of the first listener"
        }
        ReadyMode::Exec => "with ready = \"exec\" a worker is ready once exec'd",
    }
}

/// Resolves when any of the watched statuses changes (or its slot ends).
async fn any_changed(statuses: &mut [(u32, watch::Receiver<WorkerStatus>)]) {
    let mut changes: Vec<Pin<Box<dyn Future<Output = _> + Send + '_>>> = statuses
        .iter_mut()
        .map(|(_, status)| Box::pin(status.changed()) as Pin<Box<dyn Future<Output = _> + Send>>)
        .collect();
    std::future::poll_fn(|cx| {
        if changes
            .iter_mut()
            .any(|change| change.as_mut().poll(cx).is_ready())
        {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// The probe tasks of one generation, one per worker.
struct Probes {
    tasks: Vec<JoinHandle<()>>,
    /// The probe sockets' addresses, registered with the selector.
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    /// Why a probe could not be set up: fails the generation at once.
    failures: mpsc::UnboundedReceiver<String>,
}

impl Probes {
    fn start(shared: &Shared, number: u32, config: &Config, progress: &Progress) -> Probes {
        let sources = Arc::new(Mutex::new(Vec::new()));
        let (failed, failures) = mpsc::unbounded_channel();
        let listener = &config.listeners[0];
        let target = probe_target(listener.address);
        let (slot, workers, registry) = {
            let state = shared.lock().unwrap();
            state.dataplanes[0].set_probing(true);
            let generation = state.generation(number);
            let workers: Vec<_> = generation
                .map(|g| {
                    g.workers
                        .iter()
                        .map(|w| (w.index, w.status.clone()))
                        .collect()
                })
                .unwrap_or_default();
            (
                generation.map(|g| g.slot).unwrap_or(0),
                workers,
                state.registry().clone(),
            )
        };
        progress.emit(format!(
            "generation {number}: probing {} workers at {target}",
            workers.len()
        ));
        let tasks = workers
            .into_iter()
            .map(|(index, status)| {
                let probe = Probe {
                    shared: shared.clone(),
                    sources: sources.clone(),
                    target,
                    slot,
                    socket_index: index * listener.sockets_per_worker,
                    payload: config.service.probe_payload.clone(),
                };
                let failed = failed.clone();
                let registry = registry.clone();
                tokio::spawn(async move {
                    match probe.run(status).await {
                        Ok(Some(pid)) => registry.deliver(
                            pid,
                            NotifyMessage {
                                ready: true,
                                ..Default::default()
                            },
                        ),
                        Ok(None) => {}
                        Err(e) => {
                            let _ = failed.send(format!("worker {index}: {e:#}"));
                        }
                    }
                })
            })
            .collect();
        Probes {
            tasks,
            sources,
            failures,
        }
    }

    fn stop(self, shared: &Shared) {
        for task in &self.tasks {
            task.abort();
        }
        let mut state = shared.lock().unwrap();
        for source in self.sources.lock().unwrap().iter() {
            state.dataplanes[0].remove_probe(*source);
        }
        state.dataplanes[0].set_probing(false);
    }
}

/// Where probes go: the listener's own address, loopback for a wildcard listener,
/// so the datagram is local delivery to the listener.
fn probe_target(address: SocketAddr) -> SocketAddr {
    let mut target = address;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    target
}

/// One worker's probe.
struct Probe {
    shared: Shared,
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    target: SocketAddr,
    slot: u32,
    socket_index: u32,
    payload: Vec<u8>,
}

impl Probe {
    /// Sends the probe until it is answered; returns the worker's pid then (None:
    /// the worker's slot ended first, which the readiness wait reports itself).
    async fn run(self, mut status: watch::Receiver<WorkerStatus>) -> Result<Option<i32>> {
        let Ok(pid) = status
            .wait_for(|s| s.pid.is_some())
            .await
            .map(|s| s.pid.unwrap_or(0))
        else {
            return Ok(None);
        };
        let socket = tokio::net::UdpSocket::bind((self.target.ip(), 0))
            .await
            .map_err(|e| anyhow::anyhow!("binding a probe socket on {}: {e}", self.target.ip()))?;
        socket
            .connect(self.target)
            .await
            .map_err(|e| anyhow::anyhow!("connecting the probe socket to {}: {e}", self.target))?;
        let source = socket.local_addr()?;
        self.sources.lock().unwrap().push(source);
        self.shared.lock().unwrap().dataplanes[0].add_probe(
            source,
            self.slot,
            self.socket_index,
        )?;
        let mut reply = vec![0u8; 65536];
        loop {
            let _ = socket.send(&self.payload).await;
            let next = tokio::time::Instant::now() + PROBE_INTERVAL;
            match tokio::time::timeout_at(next, socket.recv(&mut reply)).await {
                Ok(Ok(_)) => return Ok(Some(pid)),
                // Nothing listens yet (ECONNREFUSED comes back at once): wait out
                // the interval rather than spin until the worker binds.
                _ => tokio::time::sleep_until(next).await,
            }
        }
    }
}
