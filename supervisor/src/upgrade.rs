//! The upgrade state machine: the only code that creates, flips, drains and
//! retires generations.
//!
//! ```text
//!   build ──► spawn ──► wait ready ──► flip ──► drain old ──► retire old ──► done
//!     │         │           │
//!     └─────────┴───────────┴──► tear down the new generation; the old one keeps serving
//! ```
//!
//! The first generation at start-up takes the same path with nothing to drain.
//! Every step that can fail happens before the flip, and the flip itself is one
//! 8-byte store per listener, so a failed upgrade never touches what serves.
use std::{
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use supervisor_common::{BalanceMode, Control, GENERATION_SLOTS, Settings, cookie};
use tokio::sync::mpsc;

use crate::{
    config::Config,
    error::InputError,
    maps::{GenerationArray, ListenerDataplane},
    notify::Registry,
    sockets,
    sys::{self, SocketMemInfo},
    worker::{Policy, SlotSockets, WorkerPhase, WorkerSlot, WorkerSpec},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GenerationState {
    Starting,
    Serving,
    Draining,
    Failed,
}

/// One listener's part of a generation.
pub struct GenerationListener {
    pub name: String,
    pub address: std::net::SocketAddr,
    pub balance: BalanceMode,
    pub settings: Settings,
    pub flow_idle: Duration,
    /// The supervisor's own reference to every socket, index = socket index in the
    /// generation's array. Holding them means a socket never closes while its
    /// generation lives, even when its worker crashes, so nothing queued is lost.
    pub sockets: Arc<Vec<OwnedFd>>,
    pub sockets_per_worker: u32,
    pub array: GenerationArray,
}

pub struct Generation {
    pub number: u32,
    pub slot: u32,
    pub state: GenerationState,
    pub started: SystemTime,
    pub listeners: Vec<GenerationListener>,
    pub workers: Vec<WorkerSlot>,
}

impl Generation {
    /// Bytes queued and drops over all its sockets.
    pub fn queues(&self) -> SocketMemInfo {
        let mut total = SocketMemInfo::default();
        for listener in &self.listeners {
            for socket in listener.sockets.iter() {
                if let Ok(info) = sys::socket_meminfo(socket.as_fd()) {
                    total.queued_bytes += info.queued_bytes;
                    total.drops += info.drops;
                }
            }
        }
        total
    }
}

/// Everything the daemon knows, behind one lock held only for short, await-free
/// critical sections.
pub struct State {
    pub config: Config,
    pub dataplanes: Vec<ListenerDataplane>,
    pub generations: Vec<Generation>,
    pub next_generation: u32,
    /// The generation an upgrade is building, while one runs.
    pub upgrading_to: Option<u32>,
    pub spec: Arc<WorkerSpec>,
    pub registry: Registry,
    /// The XDP filter, when the config has `[xdp]`.
    pub xdp: Option<crate::xdp::XdpFilter>,
}

pub type Shared = Arc<Mutex<State>>;

/// Phase lines, as they happen, to whoever asked for the upgrade (and the log).
#[derive(Clone)]
pub struct Progress {
    started: Instant,
    sink: Option<mpsc::UnboundedSender<(u64, String)>>,
}

impl Progress {
    pub fn new(sink: Option<mpsc::UnboundedSender<(u64, String)>>) -> Progress {
        Progress {
            started: Instant::now(),
            sink,
        }
    }

    pub fn emit(&self, text: impl Into<String>) {
        let text = text.into();
        let at_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!("{text}");
        if let Some(sink) = &self.sink {
            let _ = sink.send((at_ms, text));
        }
    }
}

/// Clears `upgrading_to` however the upgrade ends (including when its task is aborted).
struct UpgradeGuard(Shared);

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.lock() {
            state.upgrading_to = None;
        }
    }
}

/// Reserves the right to upgrade. Refused while another upgrade (including its
/// drain) runs, so at most three generations exist and slots never collide.
pub fn begin(shared: &Shared, new_config: &Config) -> Result<u32, InputError> {
    let mut state = shared.lock().unwrap();
    if let Some(target) = state.upgrading_to {
        return Err(InputError::new(format!(
            "an upgrade to generation {target} is already in progress; try again when it has finished"
        )));
    }
    check_compatible(&state.config, new_config)?;
    let number = state.next_generation;
    state.next_generation += 1;
    state.upgrading_to = Some(number);
    Ok(number)
}

/// Listeners are the identity of the reuseport groups and the pins: they cannot
/// change under a running supervisor (restart it for that). Everything else can.
pub fn check_compatible(current: &Config, new: &Config) -> Result<(), InputError> {
    if current.service.name != new.service.name {
        return Err(InputError::new(format!(
            "{}: service.name changed from {:?} to {:?}; that needs a supervisor restart",
            new.path.display(),
            current.service.name,
            new.service.name
        )));
    }
    let describe = |c: &Config| {
        c.listeners
            .iter()
            .map(|l| format!("{}={}", l.name, l.address))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if describe(current) != describe(new) {
        return Err(InputError::new(format!(
            "{}: listeners changed from [{}] to [{}]; names and addresses cannot change on upgrade (restart the supervisor)",
            new.path.display(),
            describe(current),
            describe(new)
        )));
    }
    for (old, new_listener) in current.listeners.iter().zip(new.listeners.iter()) {
        if old.flow_table_size != new_listener.flow_table_size {
            return Err(InputError::new(format!(
                "{}: listener {:?}: flow_table_size cannot change on upgrade (the table is sized when the selector loads; restart the supervisor)",
                new.path.display(),
                new_listener.name
            )));
        }
    }
    if current.service.bpffs != new.service.bpffs
        || current.service.runtime_dir != new.service.runtime_dir
    {
        return Err(InputError::new(format!(
            "{}: bpffs and runtime_dir cannot change on upgrade (restart the supervisor)",
            new.path.display()
        )));
    }
    Ok(())
}

/// Runs a whole upgrade to generation `number` (reserved by [`begin`]).
pub async fn run(
    shared: &Shared,
    number: u32,
    config: Config,
    spec: Arc<WorkerSpec>,
    progress: &Progress,
) -> Result<()> {
    let _guard = UpgradeGuard(shared.clone());
    progress.emit(format!("generation {number}: building"));
    let ready_timeout = config.service.ready_timeout;
    let drain_timeout = config.service.drain_timeout;

    // The new XDP ruleset is built (and checked) before anything else, and
    // switched in at the flip: a bad rule refuses the upgrade with nothing changed.
    let xdp_change = match prepare_xdp(shared, &config) {
        Ok(change) => change,
        Err(e) => {
            retire(shared, number, progress);
            return Err(e);
        }
    };
    if let Err(e) = build(shared, number, &config, spec.clone(), progress) {
        teardown(shared, number, progress).await;
        return Err(e);
    }
    let probes = (config.service.ready == crate::config::ReadyMode::Probe)
        .then(|| start_probes(shared, number, &config, progress));
    let ready = wait_ready(shared, number, ready_timeout, progress).await;
    if let Some(probes) = probes {
        stop_probes(shared, probes);
    }
    if let Err(e) = ready {
        progress.emit(format!("generation {number}: failed: {e:#}"));
        teardown(shared, number, progress).await;
        return Err(e);
    }

    if let Err(e) = apply_xdp(shared, &config, xdp_change, progress) {
        progress.emit(format!("generation {number}: failed: {e:#}"));
        teardown(shared, number, progress).await;
        return Err(e);
    }
    let previous = flip(shared, number, &config, spec);
    progress.emit(format!("generation {number}: flipped, now serving"));

    for old in previous {
        drain(shared, old, drain_timeout, progress).await;
    }
    progress.emit(format!("generation {number}: upgrade complete"));
    Ok(())
}

/// What an upgrade does to the XDP filter.
enum XdpChange {
    None,
    /// New rules for the running filter, built in fresh maps.
    Rules(Box<crate::xdp::PreparedRuleset>),
    /// `[xdp]` appeared: attach at the flip.
    Start,
    /// `[xdp]` disappeared: detach after the flip.
    Remove,
}

fn prepare_xdp(shared: &Shared, config: &Config) -> Result<XdpChange> {
    let state = shared.lock().unwrap();
    Ok(match (&state.xdp, &config.xdp) {
        (Some(filter), Some(new)) => {
            XdpChange::Rules(Box::new(filter.prepare(new, &config.listener_addresses())?))
        }
        (None, Some(_)) => XdpChange::Start,
        (Some(_), None) => XdpChange::Remove,
        (None, None) => XdpChange::None,
    })
}

fn apply_xdp(
    shared: &Shared,
    config: &Config,
    change: XdpChange,
    progress: &Progress,
) -> Result<()> {
    let mut state = shared.lock().unwrap();
    match change {
        XdpChange::None => {}
        XdpChange::Rules(prepared) => {
            if let Some(filter) = state.xdp.as_mut() {
                filter.commit(*prepared)?;
                progress.emit(format!(
                    "xdp: new ruleset switched in on {}",
                    filter.interface()
                ));
            }
        }
        XdpChange::Start => {
            let xdp = config.xdp.as_ref().expect("Start only with [xdp]");
            let filter =
                crate::xdp::XdpFilter::start(xdp, &config.pin_dir(), &config.listener_addresses())?;
            progress.emit(format!(
                "xdp: filter attached to {} (link {})",
                filter.interface(),
                filter.link_id()
            ));
            state.xdp = Some(filter);
        }
        XdpChange::Remove => {
            if let Some(filter) = state.xdp.take() {
                let interface = filter.interface().to_string();
                filter.remove()?;
                progress.emit(format!("xdp: filter removed from {interface}"));
            }
        }
    }
    Ok(())
}

/// Sockets, socket arrays, workers: everything up to the point where only
/// readiness is missing.
fn build(
    shared: &Shared,
    number: u32,
    config: &Config,
    spec: Arc<WorkerSpec>,
    progress: &Progress,
) -> Result<()> {
    let mut state = shared.lock().unwrap();
    let slot = number % GENERATION_SLOTS;
    if state.generations.iter().any(|g| g.slot == slot) {
        bail!("generation slot {slot} is still in use");
    }
    state.generations.push(Generation {
        number,
        slot,
        state: GenerationState::Starting,
        started: SystemTime::now(),
        listeners: Vec::new(),
        workers: Vec::new(),
    });
    let registry = state.registry.clone();
    let mut listeners = Vec::new();
    for (listener, dataplane) in config.listeners.iter().zip(state.dataplanes.iter_mut()) {
        let count = config.sockets_for(listener);
        let mut fds = Vec::with_capacity(count as usize);
        for _ in 0..count {
            fds.push(sockets::bind_reuseport(
                listener.address,
                listener.receive_buffer,
                &listener.name,
            )?);
            if fds.len() == 1 {
                // Attached as soon as the group exists (first generation) and again
                // on every generation: cheap, and it repairs a group whose program
                // was detached behind our back.
                dataplane.attach(fds[0].as_fd())?;
            }
        }
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let array = dataplane.install_generation(number, slot, &borrowed)?;
        listeners.push(GenerationListener {
            name: listener.name.clone(),
            address: listener.address,
            balance: listener.balance.0,
            settings: Settings {
                flow_idle_ms: listener.flow_idle.as_millis() as u32,
                cookie_offset: listener.cookie_offset,
            },
            flow_idle: listener.flow_idle,
            sockets: Arc::new(fds),
            sockets_per_worker: listener.sockets_per_worker,
            array,
        });
    }
    let generation = state
        .generations
        .iter_mut()
        .find(|g| g.number == number)
        .expect("pushed above");
    generation.listeners = listeners;
    progress.emit(format!(
        "generation {number}: {} sockets bound, socket arrays pinned as gen-{number} (slot {slot})",
        generation
            .listeners
            .iter()
            .map(|l| l.sockets.len())
            .sum::<usize>()
    ));
    for index in 0..config.service.workers {
        let mut slot_sockets = SlotSockets {
            fds: Vec::new(),
            names: Vec::new(),
            cookies: Vec::new(),
            owner: Vec::new(),
        };
        for listener in &generation.listeners {
            let per = listener.sockets_per_worker as usize;
            let first = index as usize * per;
            for (offset, socket) in listener.sockets[first..first + per].iter().enumerate() {
                slot_sockets
                    .fds
                    .push(std::os::fd::AsRawFd::as_raw_fd(socket));
                slot_sockets.names.push(listener.name.clone());
                slot_sockets
                    .cookies
                    .push(cookie(number, (first + offset) as u32));
            }
            slot_sockets.owner.push(listener.sockets.clone());
        }
        generation.workers.push(WorkerSlot::start(
            number,
            index,
            spec.clone(),
            slot_sockets,
            registry.clone(),
        ));
    }
    Ok(())
}

/// Waits until every worker of the generation is ready; fails on the first that
/// cannot start or exits, or at the timeout.
async fn wait_ready(
    shared: &Shared,
    number: u32,
    timeout: Duration,
    progress: &Progress,
) -> Result<()> {
    let mut statuses: Vec<_> = {
        let state = shared.lock().unwrap();
        let generation = state
            .generations
            .iter()
            .find(|g| g.number == number)
            .context("generation vanished")?;
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
        let changes = futures_any_changed(&mut statuses);
        if tokio::time::timeout_at(deadline, changes).await.is_err() {
            let waiting: Vec<String> = statuses
                .iter()
                .filter(|(_, s)| s.borrow().state != WorkerPhase::Ready)
                .map(|(index, s)| match s.borrow().pid {
                    Some(pid) => format!("worker {index} (pid {pid})"),
                    None => format!("worker {index}"),
                })
                .collect();
            bail!(
                "{} not ready within ready_timeout ({}); with ready = \"notify\" a worker must send READY=1 to $NOTIFY_SOCKET",
                waiting.join(", "),
                humantime::format_duration(timeout)
            );
        }
    }
}

/// `ready = "probe"`: one task per worker that sends `probe_payload` from a
/// socket of the supervisor's to the first listener's address until an answer
/// comes back, then reports the worker ready. The selector steers each probe
/// socket's datagrams to its worker's first socket (`PROBES`), which is not
/// receiving traffic yet.
struct Probes {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sources: Arc<Mutex<Vec<std::net::SocketAddr>>>,
}

const PROBE_INTERVAL: Duration = Duration::from_millis(100);

fn start_probes(shared: &Shared, number: u32, config: &Config, progress: &Progress) -> Probes {
    let sources = Arc::new(Mutex::new(Vec::new()));
    let listener = &config.listeners[0];
    // Probe from the listener's own address (loopback for a wildcard listener), so
    // the datagram is local delivery to the listener.
    let target = {
        let mut target = listener.address;
        if target.ip().is_unspecified() {
            target.set_ip(match target {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        target
    };
    let (slot, workers, registry) = {
        let state = shared.lock().unwrap();
        state.dataplanes[0].set_probing(true);
        let generation = state.generations.iter().find(|g| g.number == number);
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
            state.registry.clone(),
        )
    };
    progress.emit(format!(
        "generation {number}: probing {} workers at {target}",
        workers.len()
    ));
    let tasks = workers
        .into_iter()
        .map(|(index, mut status)| {
            let shared = shared.clone();
            let sources = sources.clone();
            let registry = registry.clone();
            let payload = config.service.probe_payload.clone();
            let socket_index = index * listener.sockets_per_worker;
            tokio::spawn(async move {
                let Ok(pid) = status
                    .wait_for(|s| s.pid.is_some())
                    .await
                    .map(|s| s.pid.unwrap_or(0))
                else {
                    return;
                };
                let socket = match tokio::net::UdpSocket::bind((target.ip(), 0)).await {
                    Ok(socket) => socket,
                    Err(e) => return tracing::error!("probe socket: {e}"),
                };
                if let Err(e) = socket.connect(target).await {
                    return tracing::error!("probe connect {target}: {e}");
                }
                let Ok(source) = socket.local_addr() else {
                    return;
                };
                sources.lock().unwrap().push(source);
                if let Err(e) =
                    shared.lock().unwrap().dataplanes[0].add_probe(source, slot, socket_index)
                {
                    return tracing::error!("{e:#}");
                }
                let mut reply = vec![0u8; 65536];
                loop {
                    let _ = socket.send(&payload).await;
                    if let Ok(Ok(_)) =
                        tokio::time::timeout(PROBE_INTERVAL, socket.recv(&mut reply)).await
                    {
                        // The same path a READY=1 from the worker takes.
                        registry.deliver(
                            pid,
                            crate::notify::NotifyMessage {
                                ready: true,
                                ..Default::default()
                            },
                        );
                        return;
                    }
                }
            })
        })
        .collect();
    Probes { tasks, sources }
}

fn stop_probes(shared: &Shared, probes: Probes) {
    for task in &probes.tasks {
        task.abort();
    }
    let mut state = shared.lock().unwrap();
    for source in probes.sources.lock().unwrap().iter() {
        state.dataplanes[0].remove_probe(*source);
    }
    state.dataplanes[0].set_probing(false);
}

/// Resolves when any of the watched statuses changes.
async fn futures_any_changed(
    statuses: &mut [(
        u32,
        tokio::sync::watch::Receiver<crate::worker::WorkerStatus>,
    )],
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::new();
    for (_, status) in statuses.iter() {
        let mut status = status.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = status.changed().await;
            let _ = tx.send(());
        }));
    }
    let _ = rx.recv().await;
    for task in tasks {
        task.abort();
    }
}

/// The switch: one control-word store per listener. Returns the generations that
/// now drain.
fn flip(shared: &Shared, number: u32, config: &Config, spec: Arc<WorkerSpec>) -> Vec<u32> {
    let mut state = shared.lock().unwrap();
    let state = &mut *state;
    let generation = state
        .generations
        .iter_mut()
        .find(|g| g.number == number)
        .expect("built");
    for (listener, dataplane) in generation.listeners.iter().zip(state.dataplanes.iter()) {
        dataplane.flip(
            Control {
                working_slot: generation.slot as u8,
                balance_mode: listener.balance as u8,
                socket_count: listener.sockets.len() as u16,
                generation: number,
            },
            listener.settings,
        );
    }
    generation.state = GenerationState::Serving;
    for worker in &generation.workers {
        worker.set_policy(Policy::Serve);
    }
    state.config = config.clone();
    state.spec = spec;
    let mut previous = Vec::new();
    for old in state
        .generations
        .iter_mut()
        .filter(|g| g.number != number && g.state == GenerationState::Serving)
    {
        old.state = GenerationState::Draining;
        previous.push(old.number);
    }
    previous
}

/// How long the queues must read empty before the drain signal goes out: a
/// datagram selected just before the flip may still be on its way into an old
/// socket on another CPU for a few microseconds.
const QUEUE_QUIET_POLLS: u32 = 3;
const QUEUE_POLL: Duration = Duration::from_millis(10);
/// Of `drain_timeout`, what waiting for idle flows leaves (at most) for the drain
/// signal and the workers' exit.
const DRAIN_RESERVE: Duration = Duration::from_secs(5);

/// Drains and retires generation `number`, which no longer receives new datagrams.
pub async fn drain(shared: &Shared, number: u32, drain_timeout: Duration, progress: &Progress) {
    let deadline = tokio::time::Instant::now() + drain_timeout;
    tokio::time::sleep(QUEUE_POLL).await;
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
    let mut queued = 0;
    while quiet < QUEUE_QUIET_POLLS {
        queued = shared
            .lock()
            .unwrap()
            .generations
            .iter()
            .find(|g| g.number == number)?
            .queues()
            .queued_bytes;
        quiet = if queued == 0 { quiet + 1 } else { 0 };
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(QUEUE_POLL).await;
    }
    Some(queued)
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
        let generation = state.generations.iter().find(|g| g.number == number)?;
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
) -> Option<Vec<tokio::sync::watch::Receiver<crate::worker::WorkerStatus>>> {
    let state = shared.lock().unwrap();
    let generation = state.generations.iter().find(|g| g.number == number)?;
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
async fn all_finished(statuses: Vec<tokio::sync::watch::Receiver<crate::worker::WorkerStatus>>) {
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

/// Removes a failed new generation; the serving one is not touched.
async fn teardown(shared: &Shared, number: u32, progress: &Progress) {
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
fn retire(shared: &Shared, number: u32, progress: &Progress) {
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
    for dataplane in state.dataplanes.iter().take(generation.listeners.len()) {
        // Only once the generation is out of the control word (it always is here:
        // retired generations were flipped away from, failed ones never flipped to).
        if dataplane.working().generation != number {
            dataplane.clear_slot(generation.slot);
        }
    }
    let was_draining = generation.state == GenerationState::Draining;
    drop(generation);
    if was_draining {
        progress.emit(format!("generation {number}: drained and removed"));
    }
}

/// Stops every generation: the drain signal to all workers once their queues
/// are read, SIGKILL at the timeout, then sockets closed and arrays unpinned.
pub async fn stop_all(shared: &Shared, drain_timeout: Duration, progress: &Progress) {
    let numbers: Vec<(u32, Policy)> = {
        let state = shared.lock().unwrap();
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
                "generation {number}: {queued} bytes still queued at the stop's drain deadline"
            ));
        }
        statuses.extend(set_policy(shared, number, policy).into_iter().flatten());
    }
    let all_exited = all_finished(statuses);
    if tokio::time::timeout_at(deadline, all_exited).await.is_err() {
        progress.emit("workers still running at drain_timeout, killing them");
    }
    for (number, _) in numbers {
        teardown_workers(shared, number).await;
        retire(shared, number, progress);
    }
}
