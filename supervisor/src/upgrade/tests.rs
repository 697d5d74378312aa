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
    let mut text = format!(
        "[service]\nname = \"unit\"\ncommand = [\"/fake/worker\"]\nworkers = 2\n{service}\n"
    );
    for i in 0..listeners {
        text.push_str(&format!(
            "[[listen]]\nname = \"l{i}\"\naddress = \"127.0.0.1:{}\"\n",
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
        let shared = Arc::new(Mutex::new(State {
            config: config.clone(),
            dataplanes,
            generations: Vec::new(),
            next_generation: 1,
            upgrading_to: None,
            spec: spec(&config),
            workers: SlotContext {
                launcher: launcher.clone(),
                registry,
            },
            xdp: None,
        }));
        Harness {
            shared,
            log,
            launcher,
            faults,
            config,
        }
    }

    /// An upgrade as the daemon runs one (generation 1 at start-up included).
    async fn upgrade(&self) -> Result<u32> {
        let number = begin(&self.shared, &self.config)?;
        run(
            &self.shared,
            number,
            self.config.clone(),
            spec(&self.config),
            &Progress::new(None),
        )
        .await?;
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
    assert_eq!(h.upgrade().await.unwrap(), 2);
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
    assert_eq!(h.upgrade().await.unwrap(), 3);
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
        let number = begin(&shared, &config).unwrap();
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
    h.upgrade().await.unwrap();
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
    // upgrade to generation 2 takes 120 ms to get ready, so restarts (100 ms
    // backoff) happen while it runs and while generation 1 drains.
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
            ready_after: Some(Duration::from_millis(120)),
            ..Script::GOOD
        },
    );
    h.upgrade().await.unwrap();
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
        let number = begin(&shared, &config).unwrap();
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
    let refused = begin(&h.shared, &h.config).unwrap_err();
    assert!(
        refused.to_string().contains("already in progress"),
        "{refused}"
    );
    first.await.unwrap().unwrap();
    assert_eq!(h.states(), vec![(2, GenerationState::Serving)]);
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
