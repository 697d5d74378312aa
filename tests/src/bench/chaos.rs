//! The chaos figure: a steady 100 000 datagrams/s while events drawn at random with a
//! fixed seed hit the service one after the other (upgrade, refused upgrade, worker
//! SIGKILL, supervisor SIGKILL and restart, reexec). Every lost or duplicated datagram
//! is attributed to the event during which it was sent. The one loss the design allows
//! is what a SIGKILLed worker had already taken off its socket, so losses during worker
//! SIGKILLs are counted apart from all others.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::figure::{Figure, measure};
use super::table::{Table, thousands};
use crate::supervisor::{generation_numbers, worker_pids};
use crate::{
    BackgroundLoad, LoadConfig, PinDir, Report, ServiceConfig, Supervisor, TempDir, TestNet,
};

#[derive(Clone, Debug)]
pub struct ChaosPlan {
    pub events: u32,
    /// Send rate, datagrams/s.
    pub rate: u64,
    pub seed: u64,
    pub workers: u32,
}

/// A datagram sent up to this long before an event started is still in a queue or a
/// worker when the event hits: it counts for that event, not the previous one.
const IN_FLIGHT: Duration = Duration::from_millis(100);
/// How long one event may take to settle before it counts as failed.
const SETTLE: Duration = Duration::from_secs(30);
/// After this many events in a row failed, the run stops (the rest would measure
/// nothing but the first failure).
const MAX_FAILED_IN_A_ROW: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Upgrade,
    BadUpgrade,
    WorkerKill,
    SupervisorKill,
    Reexec,
}

const KINDS: [Kind; 5] = [
    Kind::Upgrade,
    Kind::BadUpgrade,
    Kind::WorkerKill,
    Kind::SupervisorKill,
    Kind::Reexec,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Upgrade => "upgrade",
            Kind::BadUpgrade => "bad upgrade (refused config)",
            Kind::WorkerKill => "worker SIGKILL",
            Kind::SupervisorKill => "supervisor SIGKILL and restart",
            Kind::Reexec => "reexec",
        }
    }
}

/// splitmix64: a fixed seed gives the same sequence of events on every run and
/// machine, with no dependency for it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// UDP receive-buffer overflows in `net` so far (`RcvbufErrors` of the namespace's
/// `/proc/net/snmp`): datagrams the kernel dropped because a socket's queue was full,
/// the workers' or the load generator's. Overload, not something an event did.
fn rcvbuf_errors(net: &TestNet) -> u64 {
    net.run_in(|| {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
        let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            return 0;
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RcvbufErrors")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    })
}

/// One event as it happened.
struct Event {
    kind: Kind,
    started: Instant,
    /// Receive-buffer overflows in the namespace from this event's start to the
    /// next one's.
    overflows: u64,
    /// `Err`: what went wrong (the event counts as failed).
    outcome: Result<(), String>,
}

/// Runs one event to a settled state: one generation serving, every worker ready.
fn run_event(
    kind: Kind,
    sup: &mut Supervisor<'_>,
    good: &ServiceConfig,
    rng: &mut Rng,
) -> Result<(), String> {
    // The one `error:` line of a failed command (else its last line), for a table note.
    let out_text = |o: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&o.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .or_else(|| stderr.lines().last())
            .unwrap_or("");
        line.chars().take(300).collect::<String>()
    };
    match kind {
        Kind::Upgrade => {
            let out = sup.upgrade();
            if !out.status.success() {
                return Err(format!("upgrade: {}", out_text(&out)));
            }
        }
        Kind::BadUpgrade => {
            sup.set_config(good.clone().service_key("wrokers", 2));
            let out = sup.upgrade();
            sup.set_config(good.clone());
            if out.status.code() != Some(2) {
                return Err(format!(
                    "a refused config must exit 2, got {}: {}",
                    out.status,
                    out_text(&out)
                ));
            }
        }
        Kind::WorkerKill => {
            let status = sup.try_status_json()?;
            let generation = *generation_numbers(&status).last().ok_or("no generation")?;
            let pids = worker_pids(&status, generation);
            if pids.is_empty() {
                return Err("no worker pid".into());
            }
            let victim = pids[rng.below(pids.len() as u64) as usize];
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(victim),
                nix::sys::signal::Signal::SIGKILL,
            )
            .map_err(|e| format!("kill {victim}: {e}"))?;
            let workers = good.workers as usize;
            sup.wait_status("the killed worker replaced", SETTLE, |v| {
                let pids = worker_pids(v, generation);
                pids.len() == workers && !pids.contains(&victim)
            });
        }
        Kind::SupervisorKill => {
            sup.kill9();
            sup.restart_same_config(&[]);
        }
        Kind::Reexec => {
            let out = crate::output_with_timeout(&mut sup.cli(&["reexec"]), SETTLE);
            if !out.status.success() {
                return Err(format!("reexec: {}", out_text(&out)));
            }
        }
    }
    let generation = sup
        .try_status_json()
        .ok()
        .and_then(|v| generation_numbers(&v).last().copied())
        .ok_or("no generation after the event")?;
    sup.wait_settled(generation, SETTLE);
    Ok(())
}

/// What the whole run gave.
struct ChaosRun {
    report: Report,
    events: Vec<Event>,
    /// Per event (same order): datagrams lost and duplicated that were sent during it.
    lost: Vec<u64>,
    duplicated: Vec<u64>,
    /// Sent before the first event (or after the last one settled): the steady state.
    outside: (u64, u64),
}

fn chaos_run(plan: &ChaosPlan, addr: SocketAddr) -> ChaosRun {
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let mut good = ServiceConfig::echo(plan.workers, addr, &pins, runtime.path());
    // Room for what queues in a killed worker's socket until its successor serves it.
    good.receive_buffer = Some(32 << 20);
    let mut sup = Supervisor::start(&net, good.clone());
    sup.wait_settled(1, SETTLE);
    let load = BackgroundLoad::start(
        &net,
        LoadConfig::new(addr)
            .senders(4)
            .rate(plan.rate)
            .grace(Duration::from_secs(5))
            .record_losses(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut rng = Rng(plan.seed);
    let mut events: Vec<Event> = Vec::new();
    let mut failed_in_a_row = 0;
    for i in 0..plan.events {
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let overflows_before = rcvbuf_errors(&net);
        if let Some(previous) = events.last_mut() {
            previous.overflows = overflows_before - previous.overflows;
        }
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_event(kind, &mut sup, &good, &mut rng)
        }))
        .unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or("panic")
                .to_string())
        });
        if let Err(e) = &outcome {
            eprintln!(
                "bench: chaos: event {} ({}) failed: {e}",
                i + 1,
                kind.label()
            );
            failed_in_a_row += 1;
            if sup.pid().is_none() {
                // The supervisor is gone; without one the run measures nothing more.
                sup.respawn(&["--fresh"]);
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    sup.wait_settled(1, SETTLE)
                }));
            }
        } else {
            failed_in_a_row = 0;
        }
        events.push(Event {
            kind,
            started,
            // The count at the start until the next event replaces it with the
            // difference.
            overflows: overflows_before,
            outcome,
        });
        if failed_in_a_row >= MAX_FAILED_IN_A_ROW {
            eprintln!("bench: chaos: {MAX_FAILED_IN_A_ROW} events failed in a row; stopping");
            break;
        }
    }
    let settled = Instant::now();
    if let Some(last) = events.last_mut() {
        last.overflows = rcvbuf_errors(&net) - last.overflows;
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = load.finish();
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sup.stop()));

    // Event i owns what was sent from IN_FLIGHT before it started until IN_FLIGHT
    // before the next one started (the last one: until it settled).
    let bounds: Vec<Instant> = events
        .iter()
        .map(|e| e.started.checked_sub(IN_FLIGHT).unwrap_or(e.started))
        .chain([settled])
        .collect();
    let attribute = |at: &[Instant]| {
        let mut per = vec![0u64; events.len()];
        let mut outside = 0;
        for &t in at {
            let i = bounds.partition_point(|&b| b <= t);
            if i == 0 || i > events.len() {
                outside += 1;
            } else {
                per[i - 1] += 1;
            }
        }
        (per, outside)
    };
    let (lost, lost_outside) = attribute(&report.lost_at);
    let (duplicated, dup_outside) = attribute(&report.duplicated_at);
    ChaosRun {
        report,
        events,
        lost,
        duplicated,
        outside: (lost_outside, dup_outside),
    }
}

pub fn chaos(plan: &ChaosPlan, addr: SocketAddr) -> Figure {
    let mut fig = Figure {
        title: format!(
            "Chaos: {} random events at {}/s",
            plan.events,
            thousands(plan.rate)
        ),
        ..Figure::default()
    };
    fig.intro.push(format!(
        "{} echo workers, 4 flows at {}/s in total. {} events drawn with seed {:#x} from: \
         upgrade (`--wait drained`), bad upgrade (a config with an unknown key: refused), \
         SIGKILL of one worker, SIGKILL of the supervisor and `run` again, `reexec`; each \
         runs until one generation serves with every worker ready, then the next starts. \
         A datagram counts for the event during which it was sent (from {} ms before the \
         event started to {} ms before the next one did). Only the loss of worker SIGKILLs \
         is allowed: what the killed worker had already taken off its socket. \
         Receive-buffer overflows (the namespace's `RcvbufErrors`: a worker's or the load \
         generator's queue was full) are counted beside them: loss there is overload of the \
         machine, not the event.",
        plan.workers,
        thousands(plan.rate),
        plan.events,
        plan.seed,
        IN_FLIGHT.as_millis(),
        IN_FLIGHT.as_millis()
    ));
    let run = match measure(
        &format!("chaos: {} events at {}/s", plan.events, plan.rate),
        || chaos_run(plan, addr),
    ) {
        Ok(r) => r,
        Err(e) => {
            fig.notes.push(format!("failed: {e}"));
            fig.json = json!({"error": e});
            return fig;
        }
    };
    #[derive(Default)]
    struct PerKind {
        events: u64,
        failed: u64,
        lost: u64,
        duplicated: u64,
        with_loss: u64,
        overflows: u64,
    }
    let mut per: BTreeMap<Kind, PerKind> = BTreeMap::new();
    for (i, e) in run.events.iter().enumerate() {
        let k = per.entry(e.kind).or_default();
        k.events += 1;
        k.failed += u64::from(e.outcome.is_err());
        k.lost += run.lost[i];
        k.duplicated += run.duplicated[i];
        k.with_loss += u64::from(run.lost[i] > 0);
        k.overflows += e.overflows;
    }
    let mut t = Table::new(&[
        "event",
        ">events",
        ">failed",
        ">lost",
        ">events with loss",
        ">duplicated",
        ">receive-buffer overflows",
        "allowed",
    ]);
    for (kind, k) in &per {
        t.row([
            kind.label().to_string(),
            thousands(k.events),
            thousands(k.failed),
            thousands(k.lost),
            thousands(k.with_loss),
            thousands(k.duplicated),
            thousands(k.overflows),
            if *kind == Kind::WorkerKill {
                "what the worker had taken".into()
            } else {
                "0".to_string()
            },
        ]);
    }
    t.row([
        "outside any event (steady state)".to_string(),
        "-".into(),
        "-".into(),
        thousands(run.outside.0),
        "-".into(),
        thousands(run.outside.1),
        "-".into(),
        "0".into(),
    ]);
    fig.tables.push(t);
    let r = &run.report;
    let allowed = per.get(&Kind::WorkerKill).map_or(0, |k| k.lost);
    fig.notes.push(format!(
        "sent {} in {:.1} s ({}/s achieved), lost {} ({} during worker SIGKILLs, allowed; \
         {} elsewhere, not allowed), duplicated {}, malformed {}, ICMP refused {}",
        thousands(r.sent),
        r.duration.as_secs_f64(),
        thousands(r.rate as u64),
        thousands(r.lost),
        thousands(allowed),
        thousands(r.lost - allowed.min(r.lost)),
        thousands(r.duplicated),
        thousands(r.malformed),
        thousands(r.refused)
    ));
    let worst: Vec<String> = {
        let mut idx: Vec<usize> = (0..run.events.len())
            .filter(|&i| run.lost[i] > 0 && run.events[i].kind != Kind::WorkerKill)
            .collect();
        idx.sort_by_key(|&i| std::cmp::Reverse(run.lost[i]));
        idx.iter()
            .take(10)
            .map(|&i| {
                format!(
                    "#{} {} ({} lost, {} receive-buffer overflows{})",
                    i + 1,
                    run.events[i].kind.label(),
                    run.lost[i],
                    run.events[i].overflows,
                    run.events[i]
                        .outcome
                        .as_ref()
                        .err()
                        .map_or(String::new(), |e| format!(", failed: {e}"))
                )
            })
            .collect()
    };
    if !worst.is_empty() {
        fig.notes.push(format!(
            "events with loss that is not allowed (worst first): {}",
            worst.join("; ")
        ));
    }
    let failures: Vec<String> = run
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            e.outcome
                .as_ref()
                .err()
                .map(|err| format!("#{} {}: {err}", i + 1, e.kind.label()))
        })
        .take(10)
        .collect();
    if !failures.is_empty() {
        fig.notes
            .push(format!("failed events (first 10): {}", failures.join("; ")));
    }
    if run.events.len() < plan.events as usize {
        fig.notes.push(format!(
            "stopped after {} of {} events ({MAX_FAILED_IN_A_ROW} failed in a row)",
            run.events.len(),
            plan.events
        ));
    }
    fig.json = json!({
        "rate": plan.rate,
        "seed": plan.seed,
        "events_planned": plan.events,
        "report": r.to_json(),
        "events": run.events.iter().enumerate().map(|(i, e)| json!({
            "kind": e.kind.label(),
            "ok": e.outcome.is_ok(),
            "error": e.outcome.as_ref().err(),
            "lost": run.lost[i],
            "duplicated": run.duplicated[i],
            "receive_buffer_overflows": e.overflows,
        })).collect::<Vec<Value>>(),
        "outside": {"lost": run.outside.0, "duplicated": run.outside.1},
    });
    fig
}
