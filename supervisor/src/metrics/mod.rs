//! Prometheus metrics (`[metrics] listen`, off by default; docs/metrics.md).
//!
//! Nearly everything is read at scrape time from the same [`State`] that
//! `supervisor status` reads, through [`crate::status::collect`]: the per-socket
//! selector counters, queues and drops, generations, the flow table, the XDP
//! counters. Only what happens and is gone (upgrade results, phase durations,
//! worker restarts) is counted as it happens, in [`EVENTS`]. The registry is built
//! afresh for each scrape, so a retired generation's series simply end.
pub mod http;
pub mod process;
pub mod stall;

use std::{sync::LazyLock, time::Duration};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{status::Status, upgrade::State};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Counted as it happens: what a scrape cannot read back from the state.
pub struct Events {
    upgrades: Family<Labels, Counter>,
    phases: Family<Labels, Histogram>,
    restarts: Family<Labels, Counter>,
}

/// The process-wide event counters (a re-exec starts them again at zero).
pub static EVENTS: LazyLock<Events> = LazyLock::new(|| Events {
    upgrades: Family::default(),
    // 1 ms .. ~65 s: a flip takes microseconds to milliseconds, a drain up to
    // `drain_timeout`.
    phases: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 17))),
    restarts: Family::default(),
});

/// How an upgrade ended: `ok`, `failed` (tried and failed) or `refused` (bad input).
pub fn upgrade_result(result: &'static str) {
    EVENTS
        .upgrades
        .get_or_create(&labels(&[("result", result)]))
        .inc();
}

/// One phase of an upgrade took `took`: `build`, `ready`, `flip` or `drain`.
pub fn upgrade_phase(phase: &'static str, took: Duration) {
    EVENTS
        .phases
        .get_or_create(&labels(&[("phase", phase)]))
        .observe(took.as_secs_f64());
}

/// A serving worker is restarted: `exited`, `signaled` or `exec_failed`.
pub fn worker_restart(reason: &'static str) {
    EVENTS
        .restarts
        .get_or_create(&labels(&[("reason", reason)]))
        .inc();
}

/// The `/metrics` body (OpenMetrics text, which Prometheus reads).
pub fn scrape(state: &State) -> String {
    let status = crate::status::collect(state);
    let mut registry = Registry::with_prefix("supervisor");
    register_state(&mut registry, &status);
    register_events(&mut registry);
    process::register(&mut registry);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

fn register_events(registry: &mut Registry) {
    // Every result and phase exists from the start, at zero.
    for result in ["ok", "failed", "refused"] {
        let _ = EVENTS
            .upgrades
            .get_or_create(&labels(&[("result", result)]));
    }
    for phase in ["build", "ready", "flip", "drain"] {
        let _ = EVENTS.phases.get_or_create(&labels(&[("phase", phase)]));
    }
    registry.register(
        "upgrades",
        "Upgrades since this supervisor image started, by result (ok, failed, refused)",
        EVENTS.upgrades.clone(),
    );
    registry.register_with_unit(
        "upgrade_phase_duration",
        "How long each phase of an upgrade took (build, ready, flip, drain)",
        Unit::Seconds,
        EVENTS.phases.clone(),
    );
    registry.register(
        "worker_restarts",
        "Serving workers restarted, by reason (exited, signaled, exec_failed)",
        EVENTS.restarts.clone(),
    );
}

/// A family of counters whose values are set once (read from the kernel).
fn counters() -> Family<Labels, Counter> {
    Family::default()
}

fn gauges() -> Family<Labels, Gauge> {
    Family::default()
}

fn set_counter(family: &Family<Labels, Counter>, labels: &Labels, value: u64) {
    family.get_or_create(labels).inc_by(value);
}

fn register_state(registry: &mut Registry, status: &Status) {
    let generations = gauges();
    for state in ["starting", "serving", "draining", "failed"] {
        let count = status
            .generations
            .iter()
            .filter(|g| g.state.as_str() == state)
            .count();
        generations
            .get_or_create(&labels(&[("state", state)]))
            .set(count as i64);
    }
    registry.register("generations", "Generations by state", generations);
    let upgrading = Gauge::<i64>::default();
    upgrading.set(status.upgrade_in_progress as i64);
    registry.register(
        "upgrade_in_progress",
        "1 while an upgrade builds a new generation",
        upgrading,
    );

    let selected = counters();
    let fallback = counters();
    let errors = counters();
    let affinity = counters();
    let drops = counters();
    let queued = gauges();
    let stalled = gauges();
    let serving = gauges();
    let generation_stalled = gauges();
    for generation in &status.generations {
        let number = generation.generation.to_string();
        let g = labels(&[("generation", &number)]);
        generation_stalled
            .get_or_create(&g)
            .set(generation.stalled as i64);
        for listener in &generation.listeners {
            let l = labels(&[("listener", &listener.name), ("generation", &number)]);
            serving.get_or_create(&l).set(listener.working as i64);
            for socket in &listener.sockets {
                let index = socket.index.to_string();
                let worker = socket.worker.to_string();
                let s = labels(&[
                    ("listener", &listener.name),
                    ("generation", &number),
                    ("socket", &index),
                    ("worker", &worker),
                ]);
                set_counter(&selected, &s, socket.selected);
                set_counter(&fallback, &s, socket.fallback);
                set_counter(&errors, &s, socket.errors);
                set_counter(&affinity, &s, socket.affinity_hits);
                set_counter(&drops, &s, socket.drops as u64);
                queued.get_or_create(&s).set(socket.queue_bytes as i64);
                stalled.get_or_create(&s).set(socket.stalled as i64);
            }
        }
    }
    registry.register(
        "socket_selected",
        "Datagrams the selector sent to this socket",
        selected,
    );
    registry.register(
        "socket_fallback",
        "Counted on socket 0 only: datagrams for which the slot had no socket array, so the kernel chose",
        fallback,
    );
    registry.register(
        "socket_errors",
        "The selector chose this socket but the kernel refused it (it had left the group)",
        errors,
    );
    registry.register(
        "socket_affinity_hits",
        "Of those selected, datagrams of a known flow or with a valid cookie",
        affinity,
    );
    registry.register(
        "socket_drops",
        "Datagrams the kernel dropped on this socket (SO_MEMINFO drops)",
        drops,
    );
    registry.register_with_unit(
        "socket_queued",
        "Receive-queue memory of this socket (SO_MEMINFO rmem_alloc)",
        Unit::Bytes,
        queued,
    );
    registry.register(
        "socket_stalled",
        "1 when this serving socket's queue has not gone down for 3 s (docs/metrics.md)",
        stalled,
    );
    registry.register(
        "generation_stalled",
        "1 when any socket of this generation is stalled",
        generation_stalled,
    );
    registry.register(
        "listener_serving",
        "1 for the generation that receives a listener's new datagrams",
        serving,
    );

    let entries = gauges();
    let capacity = gauges();
    let flow: [(&str, &str, Family<Labels, Counter>); 8] = [
        ("flow_hits", "Datagrams of a known flow", counters()),
        (
            "flow_new",
            "Flows seen for the first time (or again after expiring) and recorded",
            counters(),
        ),
        (
            "flow_expired",
            "Known flows idle longer than flow_idle, sent to the working generation",
            counters(),
        ),
        (
            "flow_evictions",
            "Flow-table entries evicted by the LRU to make room",
            counters(),
        ),
        (
            "flow_socket_gone",
            "Known flows whose socket or generation was gone, sent to the working generation",
            counters(),
        ),
        (
            "flow_insert_failed",
            "Flows that could not be entered in the table",
            counters(),
        ),
        ("cookie_hits", "Datagrams with a valid cookie", counters()),
        (
            "cookie_invalid",
            "Datagrams with a cookie that names no socket",
            counters(),
        ),
    ];
    for selector in &status.selectors {
        let l = labels(&[("listener", &selector.listener)]);
        entries
            .get_or_create(&l)
            .set(selector.flow_table_entries as i64);
        capacity
            .get_or_create(&l)
            .set(selector.flow_table_size as i64);
        let f = &selector.flow;
        let values = [
            f.hits,
            f.new_flows,
            f.expired,
            f.evictions,
            f.socket_gone,
            f.insert_failed,
            f.cookie_hits,
            f.cookie_invalid,
        ];
        for ((_, _, family), value) in flow.iter().zip(values) {
            set_counter(family, &l, value);
        }
    }
    registry.register(
        "flow_table_entries",
        "Entries in the listener's flow table",
        entries,
    );
    registry.register(
        "flow_table_capacity",
        "Size of the listener's flow table",
        capacity,
    );
    for (name, help, family) in flow {
        registry.register(name, help, family);
    }

    if let Some(xdp) = &status.xdp {
        let c = &xdp.counters;
        let i = labels(&[("interface", &xdp.interface)]);
        let passed = counters();
        set_counter(&passed, &i, c.passed);
        registry.register(
            "xdp_passed",
            "The service's datagrams that passed every XDP rule",
            passed,
        );
        let dropped = counters();
        for (reason, value) in [
            ("denied", c.denied),
            ("not_allowed", c.not_allowed),
            ("rate_limited", c.rate_limited),
            ("malformed", c.malformed),
        ] {
            let l = labels(&[("interface", &xdp.interface), ("reason", reason)]);
            set_counter(&dropped, &l, value);
        }
        registry.register(
            "xdp_dropped",
            "Packets the XDP filter dropped, by reason",
            dropped,
        );
        let dropped_bytes = counters();
        set_counter(&dropped_bytes, &i, c.dropped_bytes);
        registry.register_with_unit(
            "xdp_dropped",
            "Bytes of the packets the XDP filter dropped",
            Unit::Bytes,
            dropped_bytes,
        );
        let untouched = counters();
        for (kind, value) in [("not_ours", c.not_ours), ("fragment", c.fragments)] {
            let l = labels(&[("interface", &xdp.interface), ("kind", kind)]);
            set_counter(&untouched, &l, value);
        }
        registry.register(
            "xdp_untouched",
            "Packets the XDP filter passed without judging them (not the service's, non-first fragments)",
            untouched,
        );
    }
}
