//! Replacing the supervisor itself without touching traffic (`supervisor reexec`).
//!
//! The daemon execs a (possibly new) supervisor binary in its own process: same
//! pid, so the workers stay its children (their `PR_SET_PDEATHSIG` does not fire:
//! exec is not the death of the thread that forked them, and that thread, the main
//! one, is the one that execs). What the new image needs survives the exec as fds
//! without `FD_CLOEXEC` (the generation's sockets, the notify socket, the control
//! socket, the service lock) and a handoff file naming them. The selector and its
//! maps are pinned, so the new image adopts them from bpffs; the XDP link is
//! adopted the same way. Datagrams keep flowing through the pinned selector into
//! the workers' sockets the whole time.
//!
//! Only a settled supervisor re-execs: one serving generation, no upgrade or drain
//! under way.
use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use supervisor_common::{BalanceMode, Settings};

use crate::{
    maps::GenerationArray,
    sys,
    upgrade::{Generation, GenerationListener, GenerationState, State, slot_sockets},
    worker::{AdoptedWorker, SlotContext, WorkerSlot, WorkerSpec},
};

/// The environment variable that tells `supervisor run` it is a re-exec, and
/// where the handoff file is.
pub const HANDOFF_ENV: &str = "SUPERVISOR_REEXEC_HANDOFF";

/// The layout of [`Handoff`] this build writes and reads (see `handoff_check`).
pub const HANDOFF_FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub config_path: PathBuf,
    pub next_generation: u32,
    pub lock_fd: RawFd,
    /// The pin directory's lock (see `locks`); absent from an older image's handoff.
    #[serde(default)]
    pub pin_lock_fd: Option<RawFd>,
    pub notify_fd: RawFd,
    pub notify_name: String,
    pub control_fd: RawFd,
    pub spec: SpecHandoff,
    pub generation: GenerationHandoff,
}

/// The worker spec, as the state file records it (the same fields, the same JSON).
pub type SpecHandoff = crate::journal::SpecRecord;

#[derive(Debug, Serialize, Deserialize)]
pub struct GenerationHandoff {
    pub number: u32,
    pub slot: u32,
    pub started_unix_ms: u64,
    pub listeners: Vec<ListenerHandoff>,
    pub workers: Vec<WorkerHandoff>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerHandoff {
    pub name: String,
    pub address: SocketAddr,
    pub balance: u8,
    pub flow_idle_ms: u32,
    pub cookie_offset: u16,
    pub sockets_per_worker: u32,
    pub fds: Vec<RawFd>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerHandoff {
    pub index: u32,
    pub pid: Option<i32>,
    pub restarts: u32,
}

/// The fds of the daemon's own that must survive the exec.
pub struct DaemonFds {
    pub lock: RawFd,
    pub pin_lock: RawFd,
    pub notify: RawFd,
    pub control: RawFd,
}

fn set_cloexec(fd: RawFd, cloexec: bool) -> Result<()> {
    sys::set_cloexec(fd, cloexec).with_context(|| format!("fcntl(F_SETFD) on fd {fd}"))
}

/// Writes the handoff and marks every fd it names to survive exec. Undone by
/// [`abort`] if the exec then fails.
pub fn prepare(
    state: &State,
    config_path: &Path,
    fds: &DaemonFds,
) -> Result<(PathBuf, Vec<RawFd>)> {
    if let Some(target) = state.upgrading_to {
        bail!("an upgrade to generation {target} is in progress; re-exec when it has finished");
    }
    let [generation] = state.generations.as_slice() else {
        bail!(
            "{} generations are alive; re-exec needs exactly one, serving",
            state.generations.len()
        );
    };
    if generation.state != GenerationState::Serving {
        bail!("generation {} is not serving", generation.number);
    }
    let mut keep = vec![fds.lock, fds.pin_lock, fds.notify, fds.control];
    let listeners = generation
        .listeners
        .iter()
        .map(|l| {
            let fds: Vec<RawFd> = l.sockets.iter().map(|s| s.as_raw_fd()).collect();
            keep.extend(&fds);
            ListenerHandoff {
                name: l.name.clone(),
                address: l.address,
                balance: l.balance as u8,
                flow_idle_ms: l.settings.flow_idle_ms,
                cookie_offset: l.settings.cookie_offset,
                sockets_per_worker: l.sockets_per_worker,
                fds,
            }
        })
        .collect();
    let workers = generation
        .workers
        .iter()
        .map(|w| {
            let s = w.status.borrow();
            WorkerHandoff {
                index: w.index,
                pid: s.pid,
                restarts: s.restarts,
            }
        })
        .collect();
    let handoff = Handoff {
        config_path: config_path.to_path_buf(),
        next_generation: state.next_generation,
        lock_fd: fds.lock,
        pin_lock_fd: Some(fds.pin_lock),
        notify_fd: fds.notify,
        notify_name: state.spec.notify_socket.clone(),
        control_fd: fds.control,
        spec: SpecHandoff::of(&state.spec),
        generation: GenerationHandoff {
            number: generation.number,
            slot: generation.slot,
            started_unix_ms: generation
                .started
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            listeners,
            workers,
        },
    };
    let path = state
        .config
        .service
        .runtime_dir
        .join(format!("{}.handoff.json", state.config.service.name));
    // A new file of our own: never written through whatever is at the path.
    crate::trust::write_new_private_file(&path, &serde_json::to_vec_pretty(&handoff)?)
        .with_context(|| format!("writing {}", path.display()))?;
    for &fd in &keep {
        set_cloexec(fd, false)?;
    }
    Ok((path, keep))
}

/// The exec failed: the fds go back to close-on-exec, the handoff file away.
pub fn abort(path: &Path, kept: &[RawFd]) {
    for &fd in kept {
        let _ = set_cloexec(fd, true);
    }
    let _ = std::fs::remove_file(path);
}

/// Replaces this process image. Returns only on failure.
pub fn exec(binary: &Path, config_path: &Path, handoff: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(config_path)
        .env(HANDOFF_ENV, handoff)
        .exec()
}

/// The new image's side: everything the handoff names, taken over.
pub struct Adopted {
    pub handoff: Handoff,
    pub lock: OwnedFd,
    pub pin_lock: Option<OwnedFd>,
    pub notify: OwnedFd,
    pub control: OwnedFd,
    pub sockets: Vec<Vec<OwnedFd>>,
}

pub fn read(path: &Path) -> Result<Adopted> {
    let mut text = Vec::new();
    crate::trust::open_no_follow(path)
        .and_then(|mut file| std::io::Read::read_to_end(&mut file, &mut text))
        .with_context(|| format!("reading the re-exec handoff {}", path.display()))?;
    let handoff: Handoff = serde_json::from_slice(&text).context("malformed re-exec handoff")?;
    let _ = std::fs::remove_file(path);
    let take = |fd: RawFd| -> Result<OwnedFd> {
        let owned = sys::take_inherited_fd(fd).with_context(|| format!("inherited fd {fd}"))?;
        set_cloexec(owned.as_raw_fd(), true)?;
        Ok(owned)
    };
    let sockets = handoff
        .generation
        .listeners
        .iter()
        .map(|l| l.fds.iter().map(|&fd| take(fd)).collect::<Result<Vec<_>>>())
        .collect::<Result<Vec<_>>>()?;
    Ok(Adopted {
        lock: take(handoff.lock_fd)?,
        pin_lock: handoff.pin_lock_fd.map(take).transpose()?,
        notify: take(handoff.notify_fd)?,
        control: take(handoff.control_fd)?,
        sockets,
        handoff,
    })
}

/// Rebuilds the serving generation around the inherited sockets and the workers
/// that kept running through the exec.
pub fn adopt_generation(
    handoff: &Handoff,
    sockets: Vec<Vec<OwnedFd>>,
    pin_dir: &Path,
    spec: &Arc<WorkerSpec>,
    context: &SlotContext,
) -> Result<Generation> {
    let g = &handoff.generation;
    let mut listeners = Vec::new();
    for (l, fds) in g.listeners.iter().zip(sockets) {
        listeners.push(GenerationListener {
            name: l.name.clone(),
            address: l.address,
            balance: BalanceMode::from_u8(l.balance).context("unknown balance mode in handoff")?,
            settings: Settings {
                flow_idle_ms: l.flow_idle_ms,
                cookie_offset: l.cookie_offset,
            },
            flow_idle: Duration::from_millis(u64::from(l.flow_idle_ms)),
            sockets: Arc::new(fds),
            sockets_per_worker: l.sockets_per_worker,
            array: Box::new(GenerationArray::adopt(
                &pin_dir.join(&l.name),
                g.number,
                g.slot,
            )?),
        });
    }
    let workers = g
        .workers
        .iter()
        .map(|w| {
            WorkerSlot::adopt(
                g.number,
                w.index,
                spec.clone(),
                slot_sockets(&listeners, g.number, w.index),
                context.clone(),
                match w.pid {
                    // Still our child: the same process, whatever its start time.
                    Some(pid) => AdoptedWorker::Running {
                        pid,
                        start_time: None,
                        drain_signalled: false,
                    },
                    None => AdoptedWorker::Restart,
                },
                w.restarts,
            )
        })
        .collect();
    Ok(Generation {
        number: g.number,
        slot: g.slot,
        state: GenerationState::Serving,
        started: UNIX_EPOCH + Duration::from_millis(g.started_unix_ms),
        drain: None,
        slot_released: false,
        listeners,
        workers,
    })
}

/// The worker spec as the previous image ran it (its workers must be restarted
/// the same way), with this image's view of the environment.
pub fn spec(handoff: &Handoff, inherited_env: Vec<(String, String)>) -> Result<WorkerSpec> {
    handoff
        .spec
        .to_spec(inherited_env, handoff.notify_name.clone())
        .context("the re-exec handoff's worker spec")
}

/// When this process image started (for `status`: a re-exec shows as a new time
/// under the same pid).
pub fn image_started() -> SystemTime {
    static STARTED: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    *STARTED.get_or_init(SystemTime::now)
}
