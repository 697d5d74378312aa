//! What the daemon knows about its generations, behind one lock.
use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use supervisor_common::{BalanceMode, Settings};
use tokio::{
    sync::{mpsc, watch},
    task::AbortHandle,
};

use crate::{
    config::Config,
    dataplane::{Dataplane, InstalledArray},
    notify::Registry,
    sys::{self, SocketMemInfo},
    worker::{SlotContext, WorkerSlot, WorkerSpec},
    xdp::XdpFilter,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenerationState {
    /// Built, its workers starting; receives nothing yet.
    Starting,
    /// The control word names it: new datagrams go here.
    Serving,
    /// Flipped away from; its workers empty their queues and exit.
    Draining,
    /// Did not become ready; being torn down.
    Failed,
}

impl GenerationState {
    /// The name `status` shows (the same as in its JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            GenerationState::Starting => "starting",
            GenerationState::Serving => "serving",
            GenerationState::Draining => "draining",
            GenerationState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for GenerationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// The pinned socket array; dropping it removes the pin.
    pub array: Box<dyn InstalledArray>,
}

pub struct Generation {
    pub number: u32,
    pub slot: u32,
    pub state: GenerationState,
    pub started: SystemTime,
    /// Since when it drains, and until when at most (set at the flip away from it).
    pub drain: Option<DrainClock>,
    /// It gave its slot to a newer generation (`on_no_free_slot = "retire-oldest"`):
    /// the selector sends it nothing any more, its flows moved to the working
    /// generation, and `slot` may already hold another generation.
    pub slot_released: bool,
    /// One per listener, in config order. Filled as each listener is built, so a
    /// generation that fails half-way is torn down listener by listener.
    pub listeners: Vec<GenerationListener>,
    pub workers: Vec<WorkerSlot>,
}

/// When a generation started draining, and its `drain_timeout` deadline.
#[derive(Debug, Clone, Copy)]
pub struct DrainClock {
    pub since: SystemTime,
    pub deadline: SystemTime,
}

impl Generation {
    /// A generation being built in `slot`.
    pub fn starting(number: u32, slot: u32) -> Generation {
        Generation {
            number,
            slot,
            state: GenerationState::Starting,
            started: SystemTime::now(),
            drain: None,
            slot_released: false,
            listeners: Vec::new(),
            workers: Vec::new(),
        }
    }

    /// Whether its slot in `GENERATIONS` is still its own.
    pub fn holds_slot(&self) -> bool {
        !self.slot_released
    }

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
    /// One per listener, in config order.
    pub dataplanes: Vec<Box<dyn Dataplane>>,
    pub generations: Vec<Generation>,
    pub next_generation: u32,
    /// The generation an upgrade is building, while one runs.
    pub upgrading_to: Option<u32>,
    pub spec: Arc<WorkerSpec>,
    /// How workers are started, and where their notify messages arrive.
    pub workers: SlotContext,
    /// The XDP filter, when the config has `[xdp]`.
    pub xdp: Option<XdpFilter>,
    /// The drain task of each draining generation. A stop aborts them and drains
    /// everything itself.
    pub drains: HashMap<u32, AbortHandle>,
    /// Counts retired generations: `--wait drained` waits on it.
    pub retired: watch::Sender<u64>,
}

impl State {
    /// A state with no generation yet (or the ones a re-exec adopted).
    pub fn new(
        config: Config,
        dataplanes: Vec<Box<dyn Dataplane>>,
        spec: Arc<WorkerSpec>,
        workers: SlotContext,
        xdp: Option<XdpFilter>,
    ) -> State {
        State {
            config,
            dataplanes,
            generations: Vec::new(),
            next_generation: 1,
            upgrading_to: None,
            spec,
            workers,
            xdp,
            drains: HashMap::new(),
            retired: watch::channel(0).0,
        }
    }

    /// The generations that drain now.
    pub fn draining(&self) -> Vec<u32> {
        self.generations
            .iter()
            .filter(|g| g.state == GenerationState::Draining)
            .map(|g| g.number)
            .collect()
    }

    pub fn generation(&self, number: u32) -> Option<&Generation> {
        self.generations.iter().find(|g| g.number == number)
    }

    /// The newest serving generation's number (0: none).
    pub fn serving(&self) -> u32 {
        self.generations
            .iter()
            .filter(|g| g.state == GenerationState::Serving)
            .map(|g| g.number)
            .max()
            .unwrap_or(0)
    }

    pub fn registry(&self) -> &Registry {
        &self.workers.registry
    }
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
