//! `supervisor status`: what serves, what drains, and per socket what the selector
//! sent to it (its per-CPU counters), what is queued and what the kernel dropped.
use std::{
    fmt::Write as _,
    os::fd::AsFd,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    sys,
    upgrade::{GenerationState, State},
    worker::{WorkerPhase, WorkerStatus},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub service: String,
    pub pid: u32,
    /// When this process image started: changes on `supervisor reexec`, the pid does not.
    #[serde(default)]
    pub image_started_unix_ms: u64,
    pub upgrade_in_progress: bool,
    pub upgrading_to: Option<u32>,
    pub generations: Vec<GenerationStatus>,
    /// One per listener: the selector's own state, across generations.
    #[serde(default)]
    pub selectors: Vec<SelectorStatus>,
    #[serde(default)]
    pub xdp: Option<crate::xdp::XdpStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SelectorStatus {
    pub listener: String,
    pub working_generation: u32,
    pub balance: String,
    /// Flow-table entries (live or idle) and capacity (`flow` mode).
    pub flow_table_entries: u64,
    pub flow_table_size: u32,
    pub flow: supervisor_common::FlowCountersOut,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub generation: u32,
    pub state: GenerationState,
    pub slot: u32,
    pub started_unix_ms: u64,
    /// A draining generation: since when, and its `drain_timeout` deadline.
    #[serde(default)]
    pub draining_since_unix_ms: Option<u64>,
    #[serde(default)]
    pub drain_deadline_unix_ms: Option<u64>,
    /// It gave its slot to a newer generation (retired early): the selector sends
    /// it nothing, and its per-socket selector counters are no longer its own.
    #[serde(default)]
    pub slot_released: bool,
    /// A socket of this (serving) generation is stalled (see `metrics::stall`).
    #[serde(default)]
    pub stalled: bool,
    pub workers: Vec<WorkerStatusOut>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerStatusOut {
    pub index: u32,
    pub pid: Option<i32>,
    pub state: WorkerPhase,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
    pub balance: String,
    pub working: bool,
    /// `flow` mode: flows in the table that point at this generation and are not idle.
    pub flows_held: u64,
    pub sockets: Vec<SocketStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SocketStatus {
    pub index: u32,
    pub worker: u32,
    pub selected: u64,
    /// Of `selected`: datagrams of a known flow / with a valid cookie.
    #[serde(default)]
    pub affinity_hits: u64,
    pub errors: u64,
    pub fallback: u64,
    pub queue_bytes: u32,
    pub drops: u32,
    /// Its queue stayed non-empty and never went down for 3 s while its
    /// generation served: its worker reads nothing (see `metrics::stall`).
    #[serde(default)]
    pub stalled: bool,
}

pub fn collect(state: &State) -> Status {
    let generations = state
        .generations
        .iter()
        .map(|generation| {
            let workers = generation
                .workers
                .iter()
                .map(|w| {
                    let s: WorkerStatus = w.status.borrow().clone();
                    WorkerStatusOut {
                        index: w.index,
                        pid: s.pid,
                        state: s.state,
                        restarts: s.restarts,
                        last_exit: s.last_exit,
                        status: s.status,
                    }
                })
                .collect();
            let listeners = generation
                .listeners
                .iter()
                .zip(state.dataplanes.iter())
                .enumerate()
                .map(|(listener_index, (listener, dataplane))| {
                    let working = dataplane.working();
                    ListenerStatus {
                        name: listener.name.clone(),
                        address: listener.address.to_string(),
                        balance: crate::config::Balance(listener.balance).to_string(),
                        working: working.generation == generation.number
                            && working.socket_count > 0,
                        flows_held: if listener.balance == supervisor_common::BalanceMode::Flow {
                            dataplane
                                .live_flows()
                                .get(&generation.number)
                                .copied()
                                .unwrap_or(0)
                        } else {
                            0
                        },
                        sockets: listener
                            .sockets
                            .iter()
                            .enumerate()
                            .map(|(index, socket)| {
                                let counters = if generation.holds_slot() {
                                    dataplane.counters(generation.slot, index as u32)
                                } else {
                                    Default::default()
                                };
                                let mem = sys::socket_meminfo(socket.as_fd()).unwrap_or_default();
                                SocketStatus {
                                    index: index as u32,
                                    worker: index as u32 / listener.sockets_per_worker,
                                    selected: counters.selected,
                                    affinity_hits: counters.affinity_hits,
                                    errors: counters.errors,
                                    fallback: counters.fallback,
                                    queue_bytes: mem.queued_bytes,
                                    drops: mem.drops,
                                    stalled: crate::metrics::stall::is_stalled((
                                        generation.number,
                                        listener_index,
                                        index as u32,
                                    )),
                                }
                            })
                            .collect(),
                    }
                })
                .collect::<Vec<ListenerStatus>>();
            GenerationStatus {
                stalled: listeners
                    .iter()
                    .any(|l| l.sockets.iter().any(|s| s.stalled)),
                generation: generation.number,
                state: generation.state,
                slot: generation.slot,
                started_unix_ms: unix_ms(generation.started),
                draining_since_unix_ms: generation.drain.map(|d| unix_ms(d.since)),
                drain_deadline_unix_ms: generation.drain.map(|d| unix_ms(d.deadline)),
                slot_released: generation.slot_released,
                workers,
                listeners,
            }
        })
        .collect();
    let selectors = state
        .dataplanes
        .iter()
        .enumerate()
        .map(|(listener_index, dataplane)| {
            // Hits live in the per-socket counters of each live generation.
            let affinity_hits: u64 = state
                .generations
                .iter()
                .filter(|g| g.holds_slot())
                .filter_map(|g| {
                    g.listeners
                        .get(listener_index)
                        .map(|l| (g.slot, l.sockets.len() as u32))
                })
                .flat_map(|(slot, sockets)| (0..sockets).map(move |socket| (slot, socket)))
                .map(|(slot, socket)| dataplane.counters(slot, socket).affinity_hits)
                .sum();
            let working = dataplane.working();
            let (entries, capacity) = dataplane.flow_table_usage();
            SelectorStatus {
                listener: dataplane.listener().to_string(),
                working_generation: working.generation,
                balance: supervisor_common::BalanceMode::from_u8(working.balance_mode)
                    .map(|m| crate::config::Balance(m).to_string())
                    .unwrap_or_default(),
                flow_table_entries: entries,
                flow_table_size: capacity,
                flow: supervisor_common::FlowCountersOut::new(
                    dataplane.flow_counters(),
                    affinity_hits,
                    supervisor_common::BalanceMode::from_u8(working.balance_mode)
                        .unwrap_or(supervisor_common::BalanceMode::Random),
                    entries,
                ),
            }
        })
        .collect();
    Status {
        selectors,
        xdp: state.xdp.as_ref().map(|f| f.status()),
        service: state.config.service.name.clone(),
        pid: std::process::id(),
        image_started_unix_ms: unix_ms(crate::reexec::image_started()),
        upgrade_in_progress: state.upgrading_to.is_some(),
        upgrading_to: state.upgrading_to,
        generations,
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The human-readable form.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "service {} (supervisor pid {})",
        status.service, status.pid
    );
    if let Some(target) = status.upgrading_to {
        let _ = writeln!(out, "upgrade to generation {target} in progress");
    }
    for generation in &status.generations {
        let _ = write!(
            out,
            "generation {} {} (slot {})",
            generation.generation, generation.state, generation.slot
        );
        if generation.stalled {
            let _ = write!(out, " STALLED: a socket's queue is not being read");
        }
        if let (Some(since), Some(deadline)) = (
            generation.draining_since_unix_ms,
            generation.drain_deadline_unix_ms,
        ) {
            let now = unix_ms(SystemTime::now());
            let flows: u64 = generation.listeners.iter().map(|l| l.flows_held).sum();
            let _ = write!(
                out,
                ": draining for {:.1} s, deadline in {:.1} s, {flows} flows held{}",
                now.saturating_sub(since) as f64 / 1000.0,
                deadline.saturating_sub(now) as f64 / 1000.0,
                if generation.slot_released {
                    ", retired early (slot given up)"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(out);
        for w in &generation.workers {
            let pid = w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let _ = write!(
                out,
                "  worker {} pid {pid} {} restarts {}",
                w.index, w.state, w.restarts
            );
            if let Some(exit) = &w.last_exit {
                let _ = write!(out, " (last exit: {exit})");
            }
            if let Some(text) = &w.status {
                let _ = write!(out, " status {text:?}");
            }
            let _ = writeln!(out);
        }
        for l in &generation.listeners {
            let _ = writeln!(
                out,
                "  listener {} {} balance {}{}",
                l.name,
                l.address,
                l.balance,
                if l.working {
                    " (receiving new datagrams)"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "    socket worker   selected  errors fallback  queued  drops"
            );
            for s in &l.sockets {
                let _ = writeln!(
                    out,
                    "    {:>6} {:>6} {:>10} {:>7} {:>8} {:>7} {:>6}{}",
                    s.index,
                    s.worker,
                    s.selected,
                    s.errors,
                    s.fallback,
                    s.queue_bytes,
                    s.drops,
                    if s.stalled { "  stalled" } else { "" }
                );
            }
        }
    }
    if let Some(xdp) = &status.xdp {
        out.push_str(&xdp.render());
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    for s in &status.selectors {
        let f = &s.flow;
        if s.balance == "flow" || s.balance == "cookie" {
            let _ = writeln!(
                out,
                "selector {} ({}): flow table {}/{}; hits {} new {} socket gone {} expired {} evicted {} insert failed {}; cookie hits {} invalid {}",
                s.listener,
                s.balance,
                s.flow_table_entries,
                s.flow_table_size,
                f.hits,
                f.new_flows,
                f.socket_gone,
                f.expired,
                f.evictions,
                f.insert_failed,
                f.cookie_hits,
                f.cookie_invalid
            );
        }
    }
    out
}
