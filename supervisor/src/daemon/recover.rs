//! Taking over from a supervisor of the same service that died.
//!
//! While no supervisor runs, traffic does not notice: the pinned selector, its
//! control word and socket arrays steer every datagram into the sockets of the
//! workers, which keep serving (they are not tied to the supervisor's life). A
//! supervisor that starts then finds three things, and trusts each only as far as
//! it can check it:
//!
//! - the state file (`journal`): which generations exist, their slots, workers
//!   and sockets, as of the last transition the dead supervisor recorded;
//! - the kernel: the control word says which generation serves (the flip is the
//!   commit point, so a generation recorded as starting that the control word
//!   names has flipped), the pins hold the socket arrays;
//! - the processes: a recorded worker is taken only if its pid still names the
//!   process recorded (pidfd, then start time); its sockets are copied out of it
//!   with `pidfd_getfd` and taken only if their `SO_COOKIE` is a recorded one.
//!   Under systemd the fd store hands back copies too, which is what keeps a
//!   socket (and what queued in it) alive when its worker died as well.
//!
//! Then: the generation the control word names serves; older ones that served
//! drain (on their recorded deadline); anything newer, or never flipped to, is
//! torn down (its workers killed, its pins and slot cleared). A serving worker
//! that died meanwhile is started again on its recovered sockets; if its sockets
//! died with it, the daemon builds a fresh generation at once while the
//! survivors serve (see [`Recovered::needs_new_generation`]).
//!
//! What cannot be checked is refused (exit 2) and left as it is: a state file of
//! another format or service, pins without a state file, listeners that moved.
//! `supervisor run --fresh` and `supervisor cleanup` discard it instead
//! ([`discard`]).
use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use supervisor_common::{BalanceMode, Control, Settings, pin_names};

use crate::{
    config::Config,
    dataplane::Dataplane,
    error::InputError,
    journal::{self, GenerationRecord, Snapshot},
    maps::GenerationArray,
    procfs, sys,
    upgrade::{DrainClock, Generation, GenerationListener, GenerationState, slot_sockets},
    worker::{AdoptedWorker, SlotContext, WorkerPhase, WorkerSlot, WorkerSpec},
};

/// What a start finds of a previous supervisor of this service: its state, if
/// it can be taken over; `Ok(None)` when there is nothing (a clean stop before).
/// Changes nothing.
pub(super) fn find(config: &Config) -> Result<Option<Snapshot>> {
    let path = journal::path(config);
    let snapshot = journal::read(&path).map_err(|e| refuse(config, format!("{e:#}")))?;
    let pins = listener_pins(&config.pin_dir());
    let Some(snapshot) = snapshot else {
        if pins.is_empty() {
            return Ok(None);
        }
        return Err(refuse(
            config,
            format!(
                "found pins ({}) in {} but no state file {}: they are not from a supervisor this one can take over",
                pins.join(", "),
                config.pin_dir().display(),
                path.display()
            ),
        ));
    };
    if snapshot.service != config.service.name || snapshot.pin_dir != config.pin_dir() {
        return Err(refuse(
            config,
            format!(
                "{} is the state of service {:?} pinned in {}, not of this config's service {:?} in {}",
                path.display(),
                snapshot.service,
                snapshot.pin_dir.display(),
                config.service.name,
                config.pin_dir().display()
            ),
        ));
    }
    for generation in &snapshot.generations {
        for (index, listener) in generation.listeners.iter().enumerate() {
            let configured = config.listeners.get(index);
            if configured.map(|l| (&l.name, l.address)) != Some((&listener.name, listener.address))
            {
                return Err(refuse(
                    config,
                    format!(
                        "generation {} of the running service has listener {} {:?} at {}; the config has {}",
                        generation.number,
                        index + 1,
                        listener.name,
                        listener.address,
                        configured.map_or("no such listener".to_string(), |l| format!(
                            "{:?} at {}",
                            l.name, l.address
                        ))
                    ),
                ));
            }
        }
    }
    Ok(Some(snapshot))
}

fn refuse(config: &Config, what: String) -> anyhow::Error {
    InputError::new(format!(
        "service {}: {what}; refusing to start. Workers of a previous supervisor may still \
         serve: start with the config they run under, or with `supervisor run --fresh` (or \
         `supervisor cleanup`) to stop them and remove the pins and the state",
        config.service.name
    ))
    .into()
}

/// The listener directories under the service's pin directory (the XDP link's
/// pins outlive every stop by design and are not a supervisor's leftovers).
pub(super) fn listener_pins(pin_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name != supervisor_common::xdp::pin_names::XDP_DIR)
        .collect();
    names.sort();
    names
}

/// A recorded worker whose pid still names the process recorded.
struct Verified {
    pid: i32,
    start_time: u64,
    pidfd: OwnedFd,
}

fn verify(pid: Option<i32>, start_time: Option<u64>) -> Option<Verified> {
    let (pid, start_time) = (pid?, start_time?);
    // Opened first, checked after: a pid reused before the open has another start time.
    let pidfd = sys::pidfd_open(pid).ok()?;
    (procfs::start_time(pid) == Some(start_time)).then_some(Verified {
        pid,
        start_time,
        pidfd,
    })
}

/// What was taken over, for `assemble`.
pub(super) struct Recovered {
    pub generations: Vec<Generation>,
    pub next_generation: u32,
    pub spec: WorkerSpec,
    /// No generation serves with all its sockets (its workers died while no
    /// supervisor ran, and nothing kept their sockets): a new one is built at once.
    pub needs_new_generation: bool,
}

/// Takes over what `snapshot` describes (see the module comment). `stored`: the
/// sockets systemd's fd store handed back.
pub(super) fn recover(
    config: &Config,
    snapshot: Snapshot,
    dataplanes: &[Box<dyn Dataplane>],
    stored: Vec<OwnedFd>,
    context: &SlotContext,
    spec: WorkerSpec,
) -> Result<Recovered> {
    let pin_dir = config.pin_dir();
    let serving = serving_generation(dataplanes);
    let mut pool: HashMap<u64, OwnedFd> = HashMap::new();
    for fd in stored {
        if let Ok(cookie) = sys::socket_cookie(fd.as_fd()) {
            pool.insert(cookie, fd);
        }
    }
    let spec = Arc::new(spec);
    let mut kept = Vec::new();
    let mut discarded = Vec::new();
    let mut needs_new_generation = true;
    let mut records = snapshot.generations.clone();
    records.sort_by_key(|g| g.number);
    for record in records {
        let verified: Vec<Option<Verified>> = record
            .workers
            .iter()
            .map(|w| verify(w.pid, w.start_time))
            .collect();
        collect_sockets(&record, &verified, &mut pool);
        let state = if record.number == serving {
            GenerationState::Serving
        } else if taken_over(&record, serving) {
            GenerationState::Draining
        } else {
            discarded.push((record, verified));
            continue;
        };
        match take_generation(
            &record,
            state,
            &verified,
            &mut pool,
            &pin_dir,
            &spec,
            context,
            config.service.drain_timeout,
        ) {
            Ok((generation, complete)) => {
                if state == GenerationState::Serving {
                    needs_new_generation = !complete;
                }
                kept.push(generation);
            }
            Err(e) => {
                tracing::warn!(
                    "generation {}: cannot take it over ({e:#}); tearing it down",
                    record.number
                );
                // Its workers were not adopted: killed with it.
                discarded.push((record, verified));
            }
        }
    }
    let held_slots: HashSet<u32> = kept
        .iter()
        .filter(|g| g.holds_slot())
        .map(|g| g.slot)
        .collect();
    for (record, verified) in &discarded {
        tear_down(record, verified, dataplanes, &held_slots, &pin_dir);
    }
    remove_unrecorded_arrays(&kept, dataplanes, &held_slots, &pin_dir);
    // Stored sockets of no generation taken over (retired while their removal
    // from the store was under way): out of the store.
    let strays: Vec<u64> = pool.keys().copied().collect();
    crate::fdstore::remove(&strays);
    drop(pool);
    if let Some(generation) = kept.iter().find(|g| g.state == GenerationState::Serving) {
        // A flip the dead supervisor left half done is finished here.
        for (listener, dataplane) in generation.listeners.iter().zip(dataplanes) {
            let control = Control {
                working_slot: generation.slot as u8,
                balance_mode: listener.balance as u8,
                socket_count: listener.sockets.len() as u16,
                generation: generation.number,
            };
            if dataplane.working() != control {
                dataplane.flip(control);
            }
        }
    }
    let next_generation = kept
        .iter()
        .map(|g| g.number + 1)
        .chain(discarded.iter().map(|(r, _)| r.number + 1))
        .chain([snapshot.next_generation, serving + 1])
        .max()
        .unwrap_or(1);
    tracing::info!(
        "took over from supervisor pid {}: {}; {} torn down",
        snapshot.supervisor_pid,
        if kept.is_empty() {
            "no generation".to_string()
        } else {
            kept.iter()
                .map(|g| {
                    let running = g
                        .workers
                        .iter()
                        .filter(|w| w.status.borrow().pid.is_some())
                        .count();
                    format!(
                        "generation {} {} ({running} of {} workers running)",
                        g.number,
                        g.state,
                        g.workers.len()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
        discarded.len()
    );
    Ok(Recovered {
        generations: kept,
        next_generation,
        spec: Arc::try_unwrap(spec).unwrap_or_else(|spec| (*spec).clone()),
        needs_new_generation,
    })
}

/// The kernel's word on who serves. Listeners flip one after the other, so a
/// supervisor that died in the middle leaves some on the new generation: the
/// newest one named wins, and `recover` sets every listener to it.
fn serving_generation(dataplanes: &[Box<dyn Dataplane>]) -> u32 {
    dataplanes
        .iter()
        .map(|d| d.working().generation)
        .max()
        .unwrap_or(0)
}

/// What `recover` would refuse, found before anything is changed (the daemon's
/// own sockets are not bound yet): see [`refuse_unverifiable`].
pub(super) fn check(
    config: &Config,
    snapshot: &Snapshot,
    dataplanes: &[Box<dyn Dataplane>],
) -> Result<()> {
    refuse_unverifiable(
        config,
        &snapshot.generations,
        serving_generation(dataplanes),
    )
}

/// Whether `record` is taken over (rather than torn down) when `serving` serves.
fn taken_over(record: &GenerationRecord, serving: u32) -> bool {
    record.number == serving
        || (record.number < serving
            && matches!(
                record.state,
                GenerationState::Serving | GenerationState::Draining
            ))
}

/// Refuses, before anything is changed, when a process holds a socket of a
/// generation to be taken over without being one of its recorded workers (pid
/// and start time), a descendant of one (a wrapper's child), or the service
/// manager (pid 1 keeps systemd's fd store): taking over beside it would leave a
/// process nobody supervises in the reuseport group.
fn refuse_unverifiable(config: &Config, records: &[GenerationRecord], serving: u32) -> Result<()> {
    for record in records.iter().filter(|r| taken_over(r, serving)) {
        let workers: HashSet<i32> = record
            .workers
            .iter()
            .filter_map(|w| verify(w.pid, w.start_time).map(|v| v.pid))
            .collect();
        let inodes = record.socket_inodes();
        let strangers: Vec<String> = holders_of(&inodes)
            .into_iter()
            .filter(|&pid| pid != 1 && !descends_from(pid, &workers))
            .map(procfs::describe)
            .collect();
        if !strangers.is_empty() {
            return Err(refuse(
                config,
                format!(
                    "generation {}'s sockets are held by processes its state file does not record \
                     (pid and start time): {}",
                    record.number,
                    strangers.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `pid` is one of `ancestors` or below one of them.
fn descends_from(pid: i32, ancestors: &HashSet<i32>) -> bool {
    let mut current = pid;
    // Bounded: a ppid chain ends at 1 (or 0) well before this.
    for _ in 0..64 {
        if ancestors.contains(&current) {
            return true;
        }
        match procfs::parent_pid(current) {
            Some(parent) if parent > 1 => current = parent,
            _ => return false,
        }
    }
    false
}

/// Copies out of each verified worker the sockets it holds that `record` lists
/// (found by inode in `/proc/<pid>/fd`, checked by cookie) into `pool`.
fn collect_sockets(
    record: &GenerationRecord,
    verified: &[Option<Verified>],
    pool: &mut HashMap<u64, OwnedFd>,
) {
    let inodes = record.socket_inodes();
    let cookies = record.socket_cookies();
    for worker in verified.iter().flatten() {
        for (fd, inode) in procfs::socket_fds(worker.pid) {
            if !inodes.contains(&inode) {
                continue;
            }
            let Ok(copy) = sys::pidfd_getfd(worker.pidfd.as_fd(), fd) else {
                continue;
            };
            if let Ok(cookie) = sys::socket_cookie(copy.as_fd())
                && cookies.contains(&cookie)
            {
                pool.entry(cookie).or_insert(copy);
            }
        }
    }
}

/// Builds the generation `record` describes around the recovered sockets and
/// workers. Returns it, and whether every socket was recovered.
#[allow(clippy::too_many_arguments)]
fn take_generation(
    record: &GenerationRecord,
    state: GenerationState,
    verified: &[Option<Verified>],
    pool: &mut HashMap<u64, OwnedFd>,
    pin_dir: &Path,
    spec: &Arc<WorkerSpec>,
    context: &SlotContext,
    drain_timeout: Duration,
) -> Result<(Generation, bool)> {
    let mut complete = true;
    let mut missing: HashSet<(usize, usize)> = HashSet::new();
    let mut listeners = Vec::new();
    for (l, listener) in record.listeners.iter().enumerate() {
        let mut sockets = Vec::with_capacity(listener.cookies.len());
        for (index, cookie) in listener.cookies.iter().enumerate() {
            match pool.remove(cookie) {
                Some(fd) => sockets.push(fd),
                None => {
                    complete = false;
                    missing.insert((l, index));
                    // Keeps the array's indexes; never given to a worker (the
                    // slot that owned the socket is `Gone`) and never bound.
                    sockets.push(placeholder_socket(listener.address)?);
                }
            }
        }
        listeners.push(GenerationListener {
            name: listener.name.clone(),
            address: listener.address,
            balance: BalanceMode::from_u8(listener.balance)
                .ok_or_else(|| anyhow::anyhow!("unknown balance mode {}", listener.balance))?,
            settings: Settings {
                flow_idle_ms: listener.flow_idle_ms,
                cookie_offset: listener.cookie_offset,
            },
            flow_idle: Duration::from_millis(u64::from(listener.flow_idle_ms)),
            sockets: Arc::new(sockets),
            sockets_per_worker: listener.sockets_per_worker,
            array: Box::new(GenerationArray::adopt(
                &pin_dir.join(&listener.name),
                record.number,
                record.slot,
            )?),
        });
    }
    let workers = record
        .workers
        .iter()
        .zip(verified)
        .map(|(worker, verified)| {
            let owns_missing = listeners.iter().enumerate().any(|(l, listener)| {
                let first = worker.index * listener.sockets_per_worker;
                (first..first + listener.sockets_per_worker)
                    .any(|i| missing.contains(&(l, i as usize)))
            });
            let adopted = match verified {
                Some(v) => AdoptedWorker::Running {
                    pid: v.pid,
                    start_time: Some(v.start_time),
                    drain_signalled: worker.phase == WorkerPhase::Draining,
                },
                None if state == GenerationState::Serving && !owns_missing => {
                    AdoptedWorker::Restart
                }
                None => AdoptedWorker::Gone,
            };
            WorkerSlot::adopt(
                record.number,
                worker.index,
                spec.clone(),
                slot_sockets(&listeners, record.number, worker.index),
                context.clone(),
                adopted,
                worker.restarts,
            )
        })
        .collect();
    let drain = (state == GenerationState::Draining).then(|| match record.drain {
        Some((since, deadline)) => DrainClock {
            since: journal::from_unix_ms(since),
            deadline: journal::from_unix_ms(deadline),
        },
        // Flipped away from just before the supervisor died: its drain starts now.
        None => {
            let since = SystemTime::now();
            DrainClock {
                since,
                deadline: since + drain_timeout,
            }
        }
    });
    Ok((
        Generation {
            number: record.number,
            slot: record.slot,
            state,
            started: journal::from_unix_ms(record.started_unix_ms),
            drain,
            slot_released: record.slot_released,
            listeners,
            workers,
        },
        complete,
    ))
}

/// An unbound UDP socket of `address`'s family.
fn placeholder_socket(address: std::net::SocketAddr) -> Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let family = if address.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    Ok(socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Tears down a generation that is not taken over: its workers (and whatever
/// else holds its sockets) killed, its slot cleared unless a kept generation
/// holds it, its arrays unpinned, its sockets out of the fd store.
fn tear_down(
    record: &GenerationRecord,
    verified: &[Option<Verified>],
    dataplanes: &[Box<dyn Dataplane>],
    held_slots: &HashSet<u32>,
    pin_dir: &Path,
) {
    let mut killed = 0;
    for worker in verified.iter().flatten() {
        kill(worker.pidfd.as_fd(), worker.pid);
        killed += 1;
    }
    // Workers the dead supervisor started but had not recorded yet.
    let inodes = record.socket_inodes();
    for pid in holders_of(&inodes) {
        if let Ok(pidfd) = sys::pidfd_open(pid) {
            kill(pidfd.as_fd(), pid);
            killed += 1;
        }
    }
    if !record.slot_released && !held_slots.contains(&record.slot) {
        for dataplane in dataplanes {
            if dataplane.working().generation != record.number {
                dataplane.clear_slot(record.slot);
            }
        }
    }
    for listener in &record.listeners {
        remove_pin(&generation_pin(pin_dir, &listener.name, record.number));
    }
    let cookies: Vec<u64> = record.socket_cookies().into_iter().collect();
    crate::fdstore::remove(&cookies);
    tracing::warn!(
        "generation {} ({}, never served or newer than the serving one): torn down, {killed} processes killed",
        record.number,
        record.state
    );
}

/// Its process group too, as for every worker the supervisor kills.
fn kill(pidfd: std::os::fd::BorrowedFd<'_>, pid: i32) {
    if let Err(e) = crate::process::kill_with_group(pidfd, pid) {
        tracing::warn!("killing pid {pid}: {e}");
    }
}

/// Pids (other than this one) holding any socket in `inodes`: one pass over /proc.
fn holders_of(inodes: &HashSet<u64>) -> Vec<i32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            procfs::socket_fds(pid)
                .iter()
                .any(|(_, inode)| inodes.contains(inode))
        })
        .collect()
}

fn generation_pin(pin_dir: &Path, listener: &str, number: u32) -> PathBuf {
    pin_dir
        .join(listener)
        .join(format!("{}{number}", pin_names::GENERATION_PREFIX))
}

fn remove_pin(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", path.display());
    }
}

/// `gen-<N>` pins no recorded generation explains (the supervisor died while it
/// built generation N, before it recorded it): removed, their slot cleared.
fn remove_unrecorded_arrays(
    kept: &[Generation],
    dataplanes: &[Box<dyn Dataplane>],
    held_slots: &HashSet<u32>,
    pin_dir: &Path,
) {
    let known: HashSet<u32> = kept.iter().map(|g| g.number).collect();
    for dataplane in dataplanes {
        let Ok(entries) = std::fs::read_dir(pin_dir.join(dataplane.listener())) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_prefix(pin_names::GENERATION_PREFIX))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if known.contains(&number) {
                continue;
            }
            let slot = number % supervisor_common::GENERATION_SLOTS;
            if !held_slots.contains(&slot) && dataplane.working().generation != number {
                dataplane.clear_slot(slot);
            }
            remove_pin(&entry.path());
        }
    }
}

/// Discards what a dead supervisor of this service left (`run --fresh`,
/// `supervisor cleanup`): the workers the state file names and that can be
/// verified are killed, with whatever else holds their sockets, and so is every
/// supervisor's worker still serving on a listener address (what a state file
/// of another format, a lost one, or an unverifiable worker leaves: else they
/// would stay in the reuseport group beside the new generation); the state file
/// goes. The pins are removed by the caller (a fresh start replaces them).
/// Returns how many processes were killed.
pub fn discard(config: &Config) -> usize {
    let path = journal::path(config);
    let snapshot = journal::read(&path).ok().flatten();
    let mut doomed: Vec<(i32, OwnedFd)> = Vec::new();
    let mut open = |pid: i32| {
        if !doomed.iter().any(|(p, _)| *p == pid)
            && let Ok(pidfd) = sys::pidfd_open(pid)
        {
            doomed.push((pid, pidfd));
        }
    };
    for listener in &config.listeners {
        for pid in crate::sockets::leftover_workers(listener.address, &listener.name) {
            open(pid);
        }
    }
    if let Some(snapshot) = snapshot.filter(|s| s.service == config.service.name) {
        for record in &snapshot.generations {
            for worker in &record.workers {
                if let Some(v) = verify(worker.pid, worker.start_time) {
                    open(v.pid);
                }
            }
            let inodes = record.socket_inodes();
            for pid in holders_of(&inodes) {
                open(pid);
            }
        }
    }
    for (pid, pidfd) in &doomed {
        kill(pidfd.as_fd(), *pid);
    }
    // Gone before the caller goes on: a socket a dying process still holds would
    // look like another program's to the fresh start's address check.
    wait_exited(&doomed, Duration::from_secs(5));
    journal::remove(&path);
    doomed.len()
}

/// Waits (at most `limit`) until every one of these processes has exited: a
/// pidfd becomes readable when its process exits, after its files are closed.
fn wait_exited(processes: &[(i32, OwnedFd)], limit: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = std::time::Instant::now() + limit;
    for (pid, pidfd) in processes {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, timeout), Ok(n) if n > 0) {
            tracing::warn!("pid {pid} was killed but has not exited yet");
        }
    }
}
