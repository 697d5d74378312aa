//! The state machine's failure paths, against the fakes in `fakes.rs`: no root,
//! no fork, and time paused (tokio's test clock jumps ahead whenever everything
//! waits, so a 10 s `ready_timeout` costs nothing and is exact).
use std::{
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::Result;
use nix::sys::signal::Signal;

use super::{
    Progress, Shared, State, begin,
    fakes::{FakeDataplane, FakeLauncher, Faults, Log, Script, SharedLog},
    run, stop_all,
};
use crate::{
    config::Config,
    dataplane::Dataplane,
    notify::Registry,
    process::ExitStatus,
    upgrade::GenerationState,
    worker::{SlotContext, WorkerSpec},
};

struct Harness {
    shared: Shared,
    log: SharedLog,
    launcher: Arc<FakeLauncher>,
    faults: Vec<Arc<Faults>>,
    config: Config,
}

/// A config with `listeners` listeners, 2 workers, and `service` lines added.
fn config(listeners: usize, service: &str) -> Config {
    config_with(listeners, service, "")
}

/// The same with `listen` lines added to every listener.
fn config_with(listeners: usize, service: &str, listen: &str) -> Config {
    let mut text = format!(
        "[service]\nname = \"unit\"\ncommand = [\"/fake/worker\"]\nworkers = 2\n{service}\n"
    );
    for i in 0..listeners {
        text.push_str(&format!(
            "[[listen]]\nname = \"l{i}\"\naddress = \"127.0.0.1:{}\"\n{listen}\n",
            40000 + i
        ));
    }
    Config::parse(&text, Path::new("unit.toml")).expect("test config parses")
}

fn spec(config: &Config) -> Arc<WorkerSpec> {
    Arc::new(WorkerSpec {
        program: "/fake/worker".into(),
        argv: vec!["worker".into()],
        inherited_env: Vec::new(),
        notify_socket: "@fake".into(),
        credentials: None,
        no_new_privs: true,
        ready: config.service.ready,
        drain_signal: Signal::SIGTERM,
        handoff: config.service.handoff,
    })
}

impl Harness {
    fn new(config: Config) -> Harness {
        let log: SharedLog = Arc::new(Mutex::new(Log::default()));
        let registry = Registry::default();
        let launcher = Arc::new(FakeLauncher::new(&log, &registry));
        let mut faults = Vec::new();
        let dataplanes = config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let dataplane = FakeDataplane::new(i, &l.name, &log);
                faults.push(dataplane.faults.clone());
                Box::new(dataplane) as Box<dyn Dataplane>
            })
            .collect();
        let shared = Arc::new(Mutex::new(State::new(
            config.clone(),
            dataplanes,
            spec(&config),
            SlotContext {
                launcher: launcher.clone(),
                registry,
                // No path: the state machine's tests write no state file.
                journal: Default::default(),
            },
            None,
        )));
        Harness {
            shared,
            log,
            launcher,
            faults,
            config,
        }
    }

    /// An upgrade as the daemon runs one (generation 1 at start-up included),
    /// answered when the new generation serves; its older generations drain in
    /// the background.
    async fn upgrade(&self) -> Result<u32> {
        let progress = Progress::new(None);
        let number = begin(&self.shared, &self.config, &progress)?;
        run(
            &self.shared,
            number,
            self.config.clone(),
            spec(&self.config),
            &progress,
        )
        .await?;
        Ok(number)
    }

    /// The same, then waits until the generations it flipped away from are gone
    /// (`--wait drained`).
    async fn upgrade_drained(&self) -> Result<u32> {
        let number = self.upgrade().await?;
        let draining = self.shared.lock().unwrap().draining();
        super::wait_drained(&self.shared, &draining).await;
        Ok(number)
    }

    fn states(&self) -> Vec<(u32, GenerationState)> {
        let state = self.shared.lock().unwrap();
        state
            .generations
            .iter()
            .map(|g| (g.number, g.state))
            .collect()
    }

    /// Each listener's control word names generation `number`.
    fn working(&self, number: u32) -> bool {
        let state = self.shared.lock().unwrap();
        state
            .dataplanes
            .iter()
            .all(|d| d.working().generation == number)
    }

    /// Only generation `number` is in a slot and pinned, on every listener.
    fn only_installed(&self, number: u32) {
        let log = self.log.lock().unwrap();
        for (listener, installed) in log.installed.iter().enumerate() {
            let generations: Vec<u32> = installed.values().copied().collect();
            assert_eq!(generations, vec![number], "slots of listener {listener}");
            let pinned: Vec<u32> = log.pinned[listener].iter().copied().collect();
            assert_eq!(pinned, vec![number], "pins of listener {listener}");
        }
    }

    /// The processes still running.
    fn running(&self) -> Vec<i32> {
        let mut running: Vec<i32> = self.log.lock().unwrap().running.iter().copied().collect();
        running.sort();
        running
    }

    fn spawned(&self, generation: u32) -> Vec<i32> {
        self.log
            .lock()
            .unwrap()
            .spawned
            .get(&generation)
            .cloned()
            .unwrap_or_default()
    }

    fn signals_to(&self, pid: i32) -> Vec<i32> {
        let log = self.log.lock().unwrap();
        log.signals
            .iter()
            .filter(|(p, _)| *p == pid)
            .map(|(_, s)| *s)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_flips_then_drains_and_retires_the_old_generation() {
    let h = Harness::new(config(2, ""));
    assert_eq!(h.upgrade().await.unwrap(), 1);
    assert_eq!(h.upgrade_drained().await.unwrap(), 2);
    assert_eq!(h.states(), vec![(2, GenerationState::Serving)]);
    assert!(h.working(2));
    h.only_installed(2);
    assert_eq!(h.running(), h.spawned(2));
    for pid in h.spawned(1) {
        assert_eq!(h.signals_to(pid), vec![libc::SIGTERM], "old worker {pid}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_later_listener_failing_to_bind_removes_what_earlier_ones_installed() {
    let h = Harness::new(config(3, ""));
    h.upgrade().await.unwrap();
    h.faults[2].fail_bind.store(true, Ordering::SeqCst);
    let error = h.upgrade().await.unwrap_err();
    assert!(format!("{error:#}").contains("address in use"), "{error:#}");
    // Listeners 0 and 1 had installed generation 2 in its slot: both undone.
    h.only_installed(1);
    assert_eq!(h.states(), vec![(1, GenerationState::Serving)]);
    assert!(h.working(1));
    assert_eq!(h.running(), h.spawned(1));
    // The next upgrade finds the slot free.
    h.faults[2].fail_bind.store(false, Ordering::SeqCst);
    assert_eq!(h.upgrade_drained().await.unwrap(), 3);
    h.only_installed(3);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_exits_before_ready_fails_the_upgrade_at_once() {
    let h = Harness::new(config(1, "ready_timeout = \"1h\""));
    h.upgrade().await.unwrap();
    h.launcher.script(
        2,
        Script {
            ready_after: None,
            exit_after: Some((Duration::from_millis(20), ExitStatus::Exited(3))),
            ..Script::GOOD
        },
    );
    let started = tokio::time::Instant::now();
    let error = h.upgrade().await.unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("exited with status 3 before it was ready"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "did not wait for ready_timeout"
    );
    assert_eq!(h.states(), vec![(1, GenerationState::Serving)]);
    assert!(h.working(1));
    h.only_installed(1);
    assert_eq!(h.running(), h.spawned(1));
}

#[tokio::test(start_paused = true)]
async fn ready_timeout_in_notify_mode_says_what_notify_waits_for() {
    let h = Harness::new(config(1, "ready_timeout = \"10s\""));
    h.upgrade().await.unwrap();
    h.launcher.script(
        2,
        Script {
            ready_after: None,
            ..Script::GOOD
        },
    );
    let started = tokio::time::Instant::now();
    let message = format!("{:#}", h.upgrade().await.unwrap_err());
    assert!(
        message.contains("not ready within ready_timeout (10s)"),
        "{message}"
    );
    assert!(message.contains("ready = \"notify\""), "{message}");
    assert!(started.elapsed() >= Duration::from_secs(10));
    // The workers that never got ready were killed, the old generation serves.
    for pid in h.spawned(2) {
        assert!(h.signals_to(pid).contains(&libc::SIGKILL), "worker {pid}");
    }
    assert_eq!(h.running(), h.spawned(1));
    h.only_installed(1);
}

#[tokio::test(start_paused = true)]
async fn ready_timeout_in_probe_mode_says_what_probe_waits_for() {
    // Generation 1's fake workers report ready the way a probe answer does;
    // generation 2's never answer (nothing listens at the listener's address).
    let h = Harness::new(config(1, "ready = \"probe\"\nready_timeout = \"3s\""));
    h.upgrade().await.unwrap();
    h.launcher.script(
        2,
        Script {
            ready_after: None,
            ..Script::GOOD
        },
    );
    let message = format!("{:#}", h.upgrade().await.unwrap_err());
    assert!(
        message.contains("not ready within ready_timeout (3s)"),
        "{message}"
    );
    assert!(message.contains("ready = \"probe\""), "{message}");
    assert!(!message.contains("notify"), "{message}");
    h.only_installed(1);
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_cannot_be_set_up_fails_the_upgrade_at_once() {
    let h = Harness::new(config(1, "ready = \"probe\"\nready_timeout = \"1h\""));
    h.faults[0].fail_probes.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let message = format!("{:#}", h.upgrade().await.unwrap_err());
    assert!(message.contains("readiness probe"), "{message}");
    assert!(message.contains("no space left"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waited for ready_timeout"
    );
    assert!(h.states().is_empty());
    assert!(h.running().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stop_in_the_middle_of_an_upgrade_leaves_nothing_behind() {
    let h = Harness::new(config(2, "ready_timeout = \"1h\"\ndrain_timeout = \"5s\""));
    h.upgrade().await.unwrap();
    h.launcher.script(
        2,
        Script {
            ready_after: None,
            ..Script::GOOD
        },
    );
    // The daemon runs upgrades as tasks in a JoinSet and shuts it down on stop.
    let mut upgrades = tokio::task::JoinSet::new();
    let shared = h.shared.clone();
    let config = h.config.clone();
    upgrades.spawn(async move {
        let number = begin(&shared, &config, &Progress::new(None)).unwrap();
        let _ = run(
            &shared,
            number,
            config.clone(),
            spec(&config),
            &Progress::new(None),
        )
        .await;
    });
    while h.spawned(2).len() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    upgrades.shutdown().await;
    assert_eq!(
        h.shared.lock().unwrap().upgrading_to,
        None,
        "the reservation is released"
    );
    stop_all(&h.shared, Duration::from_secs(5), &Progress::new(None)).await;
    assert!(h.states().is_empty());
    assert!(h.running().is_empty(), "processes left: {:?}", h.running());
    let log = h.log.lock().unwrap();
    // The half-built generation 2 was taken out of its slots; generation 1, the
    // one the control word still names, keeps its slot until the daemon removes
    // the whole pin directory.
    for slots in &log.installed {
        assert_eq!(
            slots.values().copied().collect::<Vec<_>>(),
            vec![1],
            "slots left"
        );
    }
    assert!(log.pinned.iter().all(|pins| pins.is_empty()), "pins left");
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_kills_old_workers_that_ignore_the_drain_signal() {
    let h = Harness::new(config(1, "drain_timeout = \"4s\""));
    h.launcher.script(
        1,
        Script {
            exits_on_drain: false,
            ..Script::GOOD
        },
    );
    h.upgrade().await.unwrap();
    let started = tokio::time::Instant::now();
    h.upgrade_drained().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(4));
    for pid in h.spawned(1) {
        assert_eq!(
            h.signals_to(pid),
            vec![libc::SIGTERM, libc::SIGKILL],
            "worker {pid}"
        );
    }
    assert_eq!(h.states(), vec![(2, GenerationState::Serving)]);
    assert_eq!(h.running(), h.spawned(2));
    h.only_installed(2);
}

#[tokio::test(start_paused = true)]
async fn a_crash_restart_racing_an_upgrade_is_drained_with_its_generation() {
    let h = Harness::new(config(1, "drain_timeout = \"10s\""));
    // Generation 1's workers crash 50 ms after they start, again and again; the
    // upgrade to generation 2 takes 260 ms to get ready, so restarts (100 ms
    // backoff) happen while it runs, and one may be due while generation 1
    // drains (the drain signal follows the flip within a few ms).
    h.launcher.script(
        1,
        Script {
            exit_after: Some((
                Duration::from_millis(50),
                ExitStatus::Signaled(libc::SIGSEGV),
            )),
            ..Script::GOOD
        },
    );
    h.upgrade().await.unwrap();
    h.launcher.script(
        2,
        Script {
            ready_after: Some(Duration::from_millis(260)),
            ..Script::GOOD
        },
    );
    h.upgrade_drained().await.unwrap();
    assert!(
        h.spawned(1).len() > 2,
        "generation 1 was restarted: {:?}",
        h.spawned(1)
    );
    assert_eq!(h.states(), vec![(2, GenerationState::Serving)]);
    assert_eq!(h.running(), h.spawned(2), "nothing of generation 1 runs");
    h.only_installed(2);
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_while_one_runs_is_refused_and_changes_nothing() {
    let h = Harness::new(config(1, "ready_timeout = \"1h\""));
    h.upgrade().await.unwrap();
    h.launcher.script(
        2,
        Script {
            ready_after: Some(Duration::from_secs(1)),
            ..Script::GOOD
        },
    );
    let shared = h.shared.clone();
    let config = h.config.clone();
    let first = tokio::spawn(async move {
        let number = begin(&shared, &config, &Progress::new(None)).unwrap();
        run(
            &shared,
            number,
            config.clone(),
            spec(&config),
            &Progress::new(None),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let refused = begin(&h.shared, &h.config, &Progress::new(None)).unwrap_err();
    assert!(
        refused.to_string().contains("already in progress"),
        "{refused}"
    );
    first.await.unwrap().unwrap();
    assert_eq!(
        h.states(),
        vec![
            (1, GenerationState::Draining),
            (2, GenerationState::Serving)
        ]
    );
}

/// A worker slot whose owner goes away (the `WorkerSlot` dropped without Drain or
/// Kill) kills its worker once, not on every turn of its loop.
#[tokio::test(start_paused = true)]
async fn an_orphaned_worker_gets_one_sigkill() {
    let h = Harness::new(config(1, ""));
    h.launcher.script(
        1,
        Script {
            kill_delay: Duration::from_millis(500),
            ..Script::GOOD
        },
    );
    h.upgrade().await.unwrap();
    let pids = h.spawned(1);
    // Drop the generation without telling its workers.
    let generation = h.shared.lock().unwrap().generations.pop().unwrap();
    drop(generation);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for pid in pids {
        assert_eq!(h.signals_to(pid), vec![libc::SIGKILL], "worker {pid}");
    }
    assert!(h.running().is_empty());
}

/// Flow mode: a draining generation keeps its flows until it has been idle for
/// `flow_idle` (10 s here; the fake selector's counters never move, so exactly
/// that), within `drain_timeout`.
fn flow_config(service: &str) -> Config {
    config_with(
        2,
        &format!("drain_timeout = \"60s\"\n{service}"),
        "balance = \"flow\"\nflow_idle = \"10s\"",
    )
}

/// Upgrades 1.5 s apart: each returns at its flip, and every older generation
/// drains on its own clock.
#[tokio::test(start_paused = true)]
async fn upgrades_return_at_the_flip_while_older_generations_drain() {
    let h = Harness::new(flow_config(""));
    h.upgrade().await.unwrap();
    for number in 2..=4 {
        let started = tokio::time::Instant::now();
        assert_eq!(h.upgrade().await.unwrap(), number);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "upgrade {number} waited for a drain"
        );
        assert!(h.working(number));
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    use GenerationState::{Draining, Serving};
    assert_eq!(
        h.states(),
        vec![(1, Draining), (2, Draining), (3, Draining), (4, Serving)]
    );
    // Generation 1 was flipped away from ~4.5 s ago and 2 ~3 s ago: 1 drains
    // first, at 10 s idle, and the others keep their flows meanwhile.
    tokio::time::sleep(Duration::from_millis(6000)).await;
    assert_eq!(h.states(), vec![(2, Draining), (3, Draining), (4, Serving)]);
    for pid in h.spawned(1) {
        assert_eq!(
            h.signals_to(pid),
            vec![libc::SIGTERM],
            "generation 1 worker {pid}"
        );
    }
    for pid in h.spawned(2).into_iter().chain(h.spawned(3)) {
        assert!(
            h.signals_to(pid).is_empty(),
            "worker {pid} was signalled early"
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.states(), vec![(4, Serving)]);
    h.only_installed(4);
    assert_eq!(h.running(), h.spawned(4));
}

/// Every slot taken (one serving, three draining): by default the oldest
/// draining generation gives its slot up and the upgrade goes on.
#[tokio::test(start_paused = true)]
async fn with_no_free_slot_the_oldest_draining_generation_retires_early() {
    let h = Harness::new(flow_config(""));
    for _ in 1..=4 {
        h.upgrade().await.unwrap();
    }
    let started = tokio::time::Instant::now();
    assert_eq!(h.upgrade().await.unwrap(), 5);
    assert!(started.elapsed() < Duration::from_secs(1));
    // Generation 5 took generation 1's slot (5 % 4 == 1)...
    assert_eq!(h.log.lock().unwrap().installed[0].get(&1), Some(&5));
    {
        let state = h.shared.lock().unwrap();
        let first = state.generation(1).expect("still draining its queues");
        assert!(first.slot_released);
    }
    // ...and generation 1 drains what it holds and goes, long before flow_idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    use GenerationState::{Draining, Serving};
    assert_eq!(
        h.states(),
        vec![(2, Draining), (3, Draining), (4, Draining), (5, Serving)]
    );
    // Its retirement did not empty the slot generation 5 now holds.
    assert_eq!(h.log.lock().unwrap().installed[0].get(&1), Some(&5));
    assert!(h.working(5));
}

#[tokio::test(start_paused = true)]
async fn with_no_free_slot_and_refuse_the_upgrade_is_refused_and_changes_nothing() {
    let h = Harness::new(flow_config("on_no_free_slot = \"refuse\""));
    for _ in 1..=4 {
        h.upgrade().await.unwrap();
    }
    let before = h.states();
    let refused = h.upgrade().await.unwrap_err();
    let message = format!("{refused:#}");
    assert!(
        message.contains("every generation slot is taken"),
        "{message}"
    );
    assert!(
        message.contains("generations 1, 2, 3 are still draining"),
        "{message}"
    );
    assert!(
        refused.chain().any(|e| e.is::<crate::error::InputError>()),
        "a refusal (exit 2)"
    );
    assert_eq!(h.states(), before);
    assert!(h.working(4));
    // Once one has drained, the next upgrade goes through.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(h.upgrade().await.unwrap(), 5);
}

/// A bad build deployed while two generations drain fails cleanly: the serving
/// and the draining generations are untouched and keep their clocks.
#[tokio::test(start_paused = true)]
async fn a_failing_upgrade_while_two_generations_drain_touches_none_of_them() {
    let h = Harness::new(flow_config("ready_timeout = \"1h\""));
    for _ in 1..=3 {
        h.upgrade().await.unwrap();
    }
    h.launcher.script(
        4,
        Script {
            ready_after: None,
            exit_after: Some((Duration::from_millis(10), ExitStatus::Exited(1))),
            ..Script::GOOD
        },
    );
    let message = format!("{:#}", h.upgrade().await.unwrap_err());
    assert!(message.contains("before it was ready"), "{message}");
    use GenerationState::{Draining, Serving};
    assert_eq!(h.states(), vec![(1, Draining), (2, Draining), (3, Serving)]);
    assert!(h.working(3));
    for pid in h.spawned(1).into_iter().chain(h.spawned(2)) {
        assert!(h.signals_to(pid).is_empty(), "worker {pid} was signalled");
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(h.states(), vec![(3, Serving)]);
    h.only_installed(3);
}
