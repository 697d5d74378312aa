//! The state file: what a supervisor that starts after this one died needs to
//! take over without touching traffic (see `daemon::recover`).
//!
//! Workers outlive a supervisor that dies, and the pinned selector keeps steering
//! datagrams into their sockets. What the kernel does not keep is *which* processes
//! and sockets make up which generation, and which of them still drain. That is
//! this file: `<runtime_dir>/<service>.state.json`, rewritten after every
//! transition (a generation built, a worker started or restarted, the flip, a
//! drain signal, a generation retired) by one task that snapshots [`State`] and
//! replaces the file with `rename(2)`, so a reader sees the old or the new
//! snapshot, never half of one.
//!
//! The snapshot may lag the truth by one transition (the supervisor can die
//! between a change and the write that follows it). Recovery is built for that:
//! the control word in the pinned map, not this file, says which generation
//! serves; a worker is taken only if its pid still names the process recorded
//! (pid plus start time); a socket is taken only if its `SO_COOKIE` is one recorded.
use std::{
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{
    config::{Config, ReadyMode},
    upgrade::{GenerationState, Shared, State},
    worker::{WorkerPhase, WorkerSpec},
};

/// Bumped whenever a field changes meaning: a supervisor refuses a state file of
/// another format rather than guess (exit 2; `run --fresh` discards it).
pub const STATE_FORMAT: u32 = 1;

/// Where the state file of `config`'s service lives.
pub fn path(config: &Config) -> PathBuf {
    config
        .service
        .runtime_dir
        .join(format!("{}.state.json", config.service.name))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub service: String,
    pub pin_dir: PathBuf,
    /// The supervisor that wrote it (for the messages of the one that reads it).
    pub supervisor_pid: u32,
    pub next_generation: u32,
    /// How the serving generation's workers are started (a crashed one is
    /// restarted the same way).
    pub spec: SpecRecord,
    pub generations: Vec<GenerationRecord>,
}

/// A [`WorkerSpec`] without this process's environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecRecord {
    pub program: String,
    pub argv: Vec<String>,
    pub credentials: Option<(u32, u32)>,
    /// Absent in a record from an image that predates the key: its default.
    #[serde(default = "no_new_privs_default")]
    pub no_new_privs: bool,
    pub ready: ReadyMode,
    pub drain_signal: String,
    /// How its workers get their sockets (`service.handoff`).
    #[serde(default)]
    pub handoff: crate::config::Handoff,
}

fn no_new_privs_default() -> bool {
    true
}

impl SpecRecord {
    pub fn of(spec: &WorkerSpec) -> SpecRecord {
        SpecRecord {
            program: spec.program.clone(),
            argv: spec.argv.clone(),
            credentials: spec.credentials,
            no_new_privs: spec.no_new_privs,
            ready: spec.ready,
            drain_signal: spec.drain_signal.as_str().to_string(),
            handoff: spec.handoff,
        }
    }

    /// The spec as it was recorded, with this process's environment and notify socket.
    pub fn to_spec(
        &self,
        inherited_env: Vec<(String, String)>,
        notify_socket: String,
    ) -> Result<WorkerSpec> {
        Ok(WorkerSpec {
            program: self.program.clone(),
            argv: self.argv.clone(),
            inherited_env,
            notify_socket,
            credentials: self.credentials,
            no_new_privs: self.no_new_privs,
            ready: self.ready,
            handoff: self.handoff,
            drain_signal: self
                .drain_signal
                .parse()
                .map_err(|_| anyhow::anyhow!("bad drain signal {:?}", self.drain_signal))?,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub number: u32,
    pub slot: u32,
    pub state: GenerationState,
    pub started_unix_ms: u64,
    /// Since when it drains and its deadline (unix ms), once flipped away from.
    pub drain: Option<(u64, u64)>,
    pub slot_released: bool,
    pub listeners: Vec<ListenerRecord>,
    pub workers: Vec<WorkerRecord>,
}

impl GenerationRecord {
    /// The inodes of all its sockets, every listener's.
    pub fn socket_inodes(&self) -> std::collections::HashSet<u64> {
        self.listeners
            .iter()
            .flat_map(|l| l.inodes.iter().copied())
            .collect()
    }

    /// The cookies of all its sockets, every listener's.
    pub fn socket_cookies(&self) -> std::collections::HashSet<u64> {
        self.listeners
            .iter()
            .flat_map(|l| l.cookies.iter().copied())
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerRecord {
    pub name: String,
    pub address: SocketAddr,
    pub balance: u8,
    pub flow_idle_ms: u32,
    pub cookie_offset: u16,
    pub sockets_per_worker: u32,
    /// `SO_COOKIE` of each socket, in array order: how recovered sockets are
    /// recognised, whoever hands them back.
    pub cookies: Vec<u64>,
    /// The inode of each socket (as in `/proc/<pid>/fd`): how the processes
    /// that hold one are found without taking a copy of every fd they have.
    #[serde(default)]
    pub inodes: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub index: u32,
    pub pid: Option<i32>,
    /// `procfs::start_time` of `pid`.
    pub start_time: Option<u64>,
    pub restarts: u32,
    pub phase: WorkerPhase,
}

pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Snapshot {
    /// No generation yet: what a start records before it pins anything, so a
    /// supervisor that dies before its first generation leaves pins the next one
    /// knows are its own.
    pub fn empty(config: &Config, spec: &WorkerSpec) -> Snapshot {
        Snapshot {
            format: STATE_FORMAT,
            service: config.service.name.clone(),
            pin_dir: config.pin_dir(),
            supervisor_pid: std::process::id(),
            next_generation: 1,
            spec: SpecRecord::of(spec),
            generations: Vec::new(),
        }
    }

    pub fn of(state: &State) -> Snapshot {
        let generations = state
            .generations
            .iter()
            .map(|g| GenerationRecord {
                number: g.number,
                slot: g.slot,
                state: g.state,
                started_unix_ms: unix_ms(g.started),
                drain: g.drain.map(|d| (unix_ms(d.since), unix_ms(d.deadline))),
                slot_released: g.slot_released,
                listeners: g
                    .listeners
                    .iter()
                    .map(|l| ListenerRecord {
                        name: l.name.clone(),
                        address: l.address,
                        balance: l.balance as u8,
                        flow_idle_ms: l.settings.flow_idle_ms,
                        cookie_offset: l.settings.cookie_offset,
                        sockets_per_worker: l.sockets_per_worker,
                        cookies: l
                            .sockets
                            .iter()
                            .map(|s| crate::sys::socket_cookie(s.as_fd()).unwrap_or(0))
                            .collect(),
                        inodes: l
                            .sockets
                            .iter()
                            .map(|s| nix::sys::stat::fstat(s.as_fd()).map_or(0, |st| st.st_ino))
                            .collect(),
                    })
                    .collect(),
                workers: g
                    .workers
                    .iter()
                    .map(|w| {
                        let s = w.status.borrow();
                        WorkerRecord {
                            index: w.index,
                            pid: s.pid,
                            start_time: s.start_time,
                            restarts: s.restarts,
                            phase: s.state,
                        }
                    })
                    .collect(),
            })
            .collect();
        Snapshot {
            format: STATE_FORMAT,
            service: state.config.service.name.clone(),
            pin_dir: state.config.pin_dir(),
            supervisor_pid: std::process::id(),
            next_generation: state.next_generation,
            spec: SpecRecord::of(&state.spec),
            generations,
        }
    }
}

/// Replaces the file at `path` with `snapshot`: written beside it, then renamed
/// over it (atomic within the runtime directory).
pub fn write(path: &Path, snapshot: &Snapshot) -> Result<()> {
    let text = serde_json::to_vec_pretty(snapshot)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    crate::trust::write_new_private_file(&temporary, &text)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
}

/// Reads the state file at `path`; `Ok(None)` when there is none.
pub fn read(path: &Path) -> Result<Option<Snapshot>> {
    let text = match crate::trust::open_no_follow(path)
        .and_then(|mut file| std::io::read_to_string(&mut file))
    {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // The format first, so a file of another format is named as such rather
    // than as malformed.
    #[derive(Deserialize)]
    struct FormatOnly {
        format: u32,
    }
    let format: FormatOnly = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a supervisor state file", path.display()))?;
    if format.format != STATE_FORMAT {
        anyhow::bail!(
            "{} has state format {}, this supervisor reads format {STATE_FORMAT}",
            path.display(),
            format.format
        );
    }
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{} is malformed", path.display()))
}

/// Removes the state file (a clean stop, a discard); a missing one is fine.
pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", path.display());
    }
}

/// Asks for the state file to be written again: cheap, callable with the state
/// locked, from the state machine and from worker slots. Without a path (unit
/// tests of the state machine) it writes nothing.
#[derive(Clone, Default)]
pub struct Journal {
    dirty: Arc<Notify>,
    path: Option<Arc<PathBuf>>,
}

impl Journal {
    pub fn at(path: PathBuf) -> Journal {
        Journal {
            dirty: Arc::default(),
            path: Some(Arc::new(path)),
        }
    }

    /// A write soon, by [`Journal::write_on_mark`].
    pub fn mark(&self) {
        self.dirty.notify_one();
    }

    /// Writes `state` now, before the caller does what must be on disk first
    /// (starting workers that hold a new generation's sockets).
    pub fn write_now(&self, state: &State) {
        if let Some(path) = &self.path
            && let Err(e) = write(path, &Snapshot::of(state))
        {
            tracing::warn!("{e:#}");
        }
    }

    /// Writes the snapshot after every [`Journal::mark`]; marks that arrive
    /// while a write runs are folded into the next one. Runs for the daemon's
    /// life (the task is aborted at a clean stop, before the file is removed).
    pub async fn write_on_mark(self, shared: Shared) {
        let Some(path) = self.path.clone() else {
            return;
        };
        loop {
            self.dirty.notified().await;
            // Snapshot under the lock, write without it.
            let snapshot = Snapshot::of(&shared.lock().unwrap());
            if let Err(e) = write(&path, &snapshot) {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Removes the file (a clean stop).
    pub fn remove(&self) {
        if let Some(path) = &self.path {
            remove(path);
        }
    }
}
