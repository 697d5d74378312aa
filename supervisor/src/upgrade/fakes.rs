//! Stand-ins for the two seams, for unit tests without root: a dataplane that
//! binds ordinary UDP sockets on loopback and records what the state machine asks
//! of the selector's maps, and a launcher whose "processes" follow a script.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::{BorrowedFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, bail};
use supervisor_common::{Control, FlowCounters, Settings, SocketCounters};
use tokio::sync::{mpsc, watch};

use crate::{
    config::ListenerConfig,
    dataplane::{Dataplane, InstalledArray},
    notify::{NotifyMessage, Registry},
    process::{ExecRequest, ExitFuture, ExitStatus, Launcher, Process},
};

/// What the fakes saw, for the tests' assertions.
#[derive(Default)]
pub struct Log {
    /// Per listener: the slots holding a generation (slot -> generation).
    pub installed: Vec<BTreeMap<u32, u32>>,
    /// Per listener: generation arrays whose pins still exist.
    pub pinned: Vec<HashSet<u32>>,
    /// Per listener: every control word stored, in order.
    pub flips: Vec<Vec<Control>>,
    /// Every signal sent, as (pid, signal).
    pub signals: Vec<(i32, i32)>,
    /// Processes started and not yet exited.
    pub running: HashSet<i32>,
    /// Every process started, by generation.
    pub spawned: BTreeMap<u32, Vec<i32>>,
}

pub type SharedLog = Arc<Mutex<Log>>;

/// One listener's fake dataplane.
pub struct FakeDataplane {
    pub index: usize,
    pub name: String,
    pub log: SharedLog,
    working: Mutex<Control>,
    pub faults: Arc<Faults>,
}

/// Faults a test switches on for one listener.
#[derive(Default)]
pub struct Faults {
    /// Binding a socket fails.
    pub fail_bind: AtomicBool,
    /// Registering a readiness probe with the selector fails.
    pub fail_probes: AtomicBool,
}

impl FakeDataplane {
    pub fn new(index: usize, name: &str, log: &SharedLog) -> FakeDataplane {
        {
            let mut log = log.lock().unwrap();
            while log.installed.len() <= index {
                log.installed.push(BTreeMap::new());
                log.pinned.push(HashSet::new());
                log.flips.push(Vec::new());
            }
        }
        FakeDataplane {
            index,
            name: name.to_string(),
            log: log.clone(),
            working: Mutex::new(Control::NONE),
            faults: Arc::default(),
        }
    }
}

struct FakeArray {
    index: usize,
    generation: u32,
    log: SharedLog,
}

impl InstalledArray for FakeArray {}

impl Drop for FakeArray {
    fn drop(&mut self) {
        self.log.lock().unwrap().pinned[self.index].remove(&self.generation);
    }
}

impl Dataplane for FakeDataplane {
    fn listener(&self) -> &str {
        &self.name
    }

    fn bind_socket(&self, listener: &ListenerConfig) -> Result<OwnedFd> {
        if self.faults.fail_bind.load(Ordering::SeqCst) {
            bail!(
                "binding {} for listener {:?}: address in use (fake)",
                listener.address,
                listener.name
            );
        }
        Ok(UdpSocket::bind("127.0.0.1:0")?.into())
    }

    fn attach(&self, _socket: BorrowedFd<'_>) -> Result<()> {
        Ok(())
    }

    fn install_generation(
        &mut self,
        generation: u32,
        slot: u32,
        _sockets: &[BorrowedFd<'_>],
        _settings: Settings,
    ) -> Result<Box<dyn InstalledArray>> {
        let mut log = self.log.lock().unwrap();
        log.installed[self.index].insert(slot, generation);
        log.pinned[self.index].insert(generation);
        Ok(Box::new(FakeArray {
            index: self.index,
            generation,
            log: self.log.clone(),
        }))
    }

    fn clear_slot(&self, slot: u32) {
        self.log.lock().unwrap().installed[self.index].remove(&slot);
    }

    fn flip(&self, control: Control) {
        *self.working.lock().unwrap() = control;
        self.log.lock().unwrap().flips[self.index].push(control);
    }

    fn working(&self) -> Control {
        *self.working.lock().unwrap()
    }

    fn counters(&self, _slot: u32, _socket: u32) -> SocketCounters {
        SocketCounters::default()
    }

    fn live_flows(&self) -> BTreeMap<u32, u64> {
        BTreeMap::new()
    }

    fn flow_counters(&self) -> FlowCounters {
        FlowCounters::default()
    }

    fn flow_table_usage(&self) -> (u64, u32) {
        (0, 0)
    }

    fn add_probe(&mut self, _source: SocketAddr, _slot: u32, _socket: u32) -> Result<()> {
        if self.faults.fail_probes.load(Ordering::SeqCst) {
            bail!("registering a readiness probe: no space left (fake)");
        }
        Ok(())
    }

    fn remove_probe(&mut self, _source: SocketAddr) {}

    fn set_probing(&self, _active: bool) {}

    fn tick_clock(&self, _running: bool) {}

    fn unpin_all(&self) {}
}

/// How a fake worker behaves.
#[derive(Clone, Copy, Debug)]
pub struct Script {
    /// Sends READY=1 this long after it starts (None: never).
    pub ready_after: Option<Duration>,
    /// Exits by itself this long after it starts, with this status.
    pub exit_after: Option<(Duration, ExitStatus)>,
    /// Exits when it gets the drain signal (SIGTERM in these tests).
    pub exits_on_drain: bool,
    /// How long SIGKILL takes to take effect.
    pub kill_delay: Duration,
}

impl Script {
    /// Ready at once, exits on the drain signal.
    pub const GOOD: Script = Script {
        ready_after: Some(Duration::from_millis(5)),
        exit_after: None,
        exits_on_drain: true,
        kill_delay: Duration::ZERO,
    };
}

/// Starts scripted processes: generation N's workers follow `scripts[N]`
/// (default [`Script::GOOD`]); after a crash a worker is started again with
/// `restart_script` if set.
pub struct FakeLauncher {
    pub log: SharedLog,
    pub registry: Registry,
    pub scripts: Mutex<HashMap<u32, Script>>,
    next_pid: Mutex<i32>,
}

impl FakeLauncher {
    pub fn new(log: &SharedLog, registry: &Registry) -> FakeLauncher {
        FakeLauncher {
            log: log.clone(),
            registry: registry.clone(),
            scripts: Mutex::new(HashMap::new()),
            next_pid: Mutex::new(1000),
        }
    }

    pub fn script(&self, generation: u32, script: Script) {
        self.scripts.lock().unwrap().insert(generation, script);
    }
}

impl Launcher for FakeLauncher {
    fn spawn(&self, request: &ExecRequest<'_>) -> io::Result<Box<dyn Process>> {
        let generation: u32 = request
            .env
            .iter()
            .find(|(k, _)| k == "SUPERVISOR_GENERATION")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let script = self
            .scripts
            .lock()
            .unwrap()
            .get(&generation)
            .copied()
            .unwrap_or(Script::GOOD);
        let pid = {
            let mut next = self.next_pid.lock().unwrap();
            *next += 1;
            *next
        };
        {
            let mut log = self.log.lock().unwrap();
            log.running.insert(pid);
            log.spawned.entry(generation).or_default().push(pid);
        }
        let (signals_tx, signals) = mpsc::unbounded_channel();
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(behave(
            pid,
            script,
            self.registry.clone(),
            signals,
            exit_tx,
            self.log.clone(),
        ));
        Ok(Box::new(FakeProcess {
            pid,
            signals: signals_tx,
            exit,
            log: self.log.clone(),
        }))
    }

    fn adopt(&self, pid: i32, _start_time: Option<u64>) -> io::Result<Box<dyn Process>> {
        Err(io::Error::other(format!("the fake cannot adopt pid {pid}")))
    }
}

async fn behave(
    pid: i32,
    script: Script,
    registry: Registry,
    mut signals: mpsc::UnboundedReceiver<i32>,
    exit: watch::Sender<Option<ExitStatus>>,
    log: SharedLog,
) {
    let started = tokio::time::Instant::now();
    let far = Duration::from_secs(1_000_000);
    let ready_at = started + script.ready_after.unwrap_or(far);
    let exit_at = started + script.exit_after.map(|(after, _)| after).unwrap_or(far);
    let mut ready_sent = script.ready_after.is_none();
    let status = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(ready_at), if !ready_sent => {
                ready_sent = true;
                registry.deliver(pid, NotifyMessage { ready: true, ..Default::default() });
            }
            _ = tokio::time::sleep_until(exit_at) => {
                break script.exit_after.map(|(_, status)| status).unwrap_or(ExitStatus::Exited(0));
            }
            Some(signal) = signals.recv() => {
                if signal == libc::SIGKILL {
                    tokio::time::sleep(script.kill_delay).await;
                    break ExitStatus::Signaled(libc::SIGKILL);
                }
                if signal == libc::SIGTERM && script.exits_on_drain {
                    break ExitStatus::Exited(0);
                }
            }
        }
    };
    log.lock().unwrap().running.remove(&pid);
    let _ = exit.send(Some(status));
}

struct FakeProcess {
    pid: i32,
    signals: mpsc::UnboundedSender<i32>,
    exit: watch::Receiver<Option<ExitStatus>>,
    log: SharedLog,
}

impl Process for FakeProcess {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn signal(&self, signal: i32) -> io::Result<()> {
        self.log.lock().unwrap().signals.push((self.pid, signal));
        let _ = self.signals.send(signal);
        Ok(())
    }

    fn exited(&mut self) -> ExitFuture<'_> {
        Box::pin(async move {
            let status = self
                .exit
                .wait_for(Option::is_some)
                .await
                .map_err(|_| io::Error::other("fake process vanished"))?;
            Ok(status.expect("waited for Some"))
        })
    }
}
