//! What goes wrong around upgrades, and that it costs nothing: a new generation that
//! fails (exits, never becomes ready) is torn down while the old one keeps serving; a
//! worker killed in a serving generation is restarted on the same sockets and its queue
//! is served; a second upgrade while one runs is refused; an invalid config on upgrade
//! changes nothing.

#![deny(unsafe_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use supervisor_tests::supervisor::{
    generation_numbers, selected_total, single_error_line, sockets_of, supervisor_command,
    try_single_error_line, worker_pids,
};
use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, bin_path,
    loadgen, output_with_timeout, require_root, wait_timeout,
};

const ADDR: &str = "127.0.0.1:5300";
const RATE: u64 = 4_000;
const SETTLE: Duration = Duration::from_secs(30);

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

fn steady_load() -> LoadConfig {
    LoadConfig::new(addr())
        .senders(2)
        .rate(RATE)
        .grace(Duration::from_secs(3))
}

/// Waits until `n` more datagrams than now were selected for `generation`.
fn wait_more_selected(sup: &mut Supervisor<'_>, generation: u32, n: u64) -> Value {
    let now = selected_total(&sup.status_json(), generation);
    sup.wait_selected(generation, now + n, SETTLE)
}

/// `<pins>/<service>/<listener>/gen-<n>`.
fn gen_pin(pins: &PinDir, config: &ServiceConfig, n: u32) -> PathBuf {
    pins.path()
        .join(&config.name)
        .join(&config.listen_name)
        .join(format!("gen-{n}"))
}

/// Generation `serving` is the only one, still serving with the same worker pids and
/// no upgrade in progress; the pin of generation `failed` is gone, `serving`'s is there.
fn assert_untouched(
    sup: &Supervisor<'_>,
    pins: &PinDir,
    serving: u32,
    pids: &[i32],
    failed: Option<u32>,
) {
    let status = sup.status_json();
    assert_eq!(
        generation_numbers(&status),
        vec![serving],
        "only generation {serving} may be left: {status}"
    );
    assert_eq!(sup.serving_generation(), serving, "{status}");
    assert_eq!(
        worker_pids(&status, serving),
        pids,
        "the serving generation's workers must be the same processes: {status}"
    );
    assert_eq!(status["upgrade_in_progress"], false, "{status}");
    let config = sup.config();
    assert!(
        gen_pin(pins, config, serving).exists(),
        "gen-{serving} must stay pinned: {:?}",
        pins.entries()
    );
    if let Some(failed) = failed {
        assert!(
            !gen_pin(pins, config, failed).exists(),
            "the failed generation's pin gen-{failed} must be removed: {:?}",
            pins.entries()
        );
    }
}

/// Waits until every thread of `pid` is in state `T` (stopped by a signal).
fn wait_all_threads_stopped(pid: i32) {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let states: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
            .expect("read the worker's threads")
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("stat")).ok())
            // "tid (comm) S ...": the state follows the last ')'.
            .filter_map(|stat| {
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().next().map(str::to_string)
            })
            .collect();
        if !states.is_empty() && states.iter().all(|s| s == "T") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker {pid} did not stop: thread states {states:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Processes in the namespace whose command line contains `needle`.
fn running(net: &TestNet, needle: &str) -> Vec<(i32, String)> {
    net.cmdlines()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(needle))
        .collect()
}

/// A shell wrapper that sleeps `seconds`, then execs the echo worker (same pid, so
/// its READY=1 counts): a worker that is slow to get ready.
fn echo_worker_after(seconds: u32) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "sleep {seconds}; exec {}",
            bin_path("echo-worker").display()
        ),
    ]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn failed_upgrades_leave_the_old_generation_serving() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let good = ServiceConfig::echo(2, addr(), &pins, runtime.path());
    let mut sup = Supervisor::start(&net, good.clone());
    let status = sup.wait_settled(1, SETTLE);
    let pids = worker_pids(&status, 1);

    let load = BackgroundLoad::start(&net, steady_load());
    sup.wait_selected(1, 200, SETTLE);

    // 1. A command that exits 1 at once: generation 2 fails before it is ready.
    let mut exits = good.clone();
    exits.command = vec!["/bin/false".into()];
    sup.set_config(exits);
    let out = sup.upgrade();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "an upgrade whose workers exit must fail with 1\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = single_error_line(&stderr);
    assert!(
        line.contains("exited with status 1"),
        "the reason must be given: {line}"
    );
    assert_untouched(&sup, &pins, 1, &pids, Some(2));
    assert_eq!(running(&net, "/bin/false"), vec![]);
    wait_more_selected(&mut sup, 1, 200);

    // 2. A command that never says READY=1: generation 3 times out and is killed.
    let mut never_ready = good.clone();
    never_ready.command = vec!["/bin/sleep".into(), "1000".into()];
    never_ready.ready_timeout = Some(Duration::from_secs(2));
    sup.set_config(never_ready);
    let out = sup.upgrade();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "an upgrade whose workers never become ready must fail with 1\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = single_error_line(&stderr);
    assert!(
        line.contains("not ready within ready_timeout"),
        "the reason must be given: {line}"
    );
    assert_untouched(&sup, &pins, 1, &pids, Some(3));
    let left = running(&net, "sleep 1000");
    assert!(
        left.is_empty(),
        "the failed generation's workers must be gone: {left:?}"
    );
    wait_more_selected(&mut sup, 1, 200);

    // 3. The failures left nothing stuck: a good upgrade still works.
    sup.set_config(good);
    sup.upgrade_ok();
    sup.wait_settled(4, SETTLE);
    sup.wait_selected(4, 200, SETTLE);

    let report = load.finish();
    println!("two failed upgrades and a good one under load:\n{report}");
    report.assert_all_answered_once();
    assert_eq!(report.refused, 0, "{report}");
    assert_eq!(
        report.per_generation.keys().copied().collect::<Vec<_>>(),
        vec![1, 4],
        "only the old and the final generation answer: {report}"
    );
    sup.stop();
    pins.assert_empty_after_stop();
}

#[test]
fn killed_worker_is_restarted_and_its_queue_served() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let mut config = ServiceConfig::echo(2, addr(), &pins, runtime.path());
    // Room for everything that queues while the worker is stopped and restarting.
    config.receive_buffer = Some(64 << 20);
    let mut sup = Supervisor::start(&net, config);
    let status = sup.wait_settled(1, SETTLE);
    let pids = worker_pids(&status, 1);
    let victim = pids[0];

    // Both workers serve; then the load pauses and every reply is in, so the victim
    // is idle in recv() and holds no datagram of its own when it is stopped.
    let warmup = net
        .run_in(|| loadgen::run(&LoadConfig::new(addr()).count(2_000).rate(RATE)))
        .expect("load generator");
    warmup.assert_all_answered_once();
    kill(Pid::from_raw(victim), Signal::SIGSTOP).expect("SIGSTOP the worker");
    // kill() returns before the group stop is complete: a thread woken from recv() but
    // not yet stopped could still take a datagram into user space (and die with it).
    wait_all_threads_stopped(victim);

    // Under load, the stopped worker's socket fills up...
    let load = BackgroundLoad::start(&net, steady_load());
    let queued_for = |v: &Value| -> u64 {
        sockets_of(v, 1)
            .iter()
            .filter(|s| s["worker"] == 0)
            .filter_map(|s| s["queue_bytes"].as_u64())
            .sum()
    };
    let status = sup.wait_status("worker 0's socket to queue 256 KiB", SETTLE, |v| {
        queued_for(v) >= 256 << 10
    });
    println!(
        "queued for the stopped worker: {} bytes",
        queued_for(&status)
    );

    // ...and then the worker is killed. The supervisor's own reference keeps the socket
    // (and its queue) alive; the restarted worker must serve it.
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("SIGKILL the worker");
    let status = sup.wait_status("worker 0 restarted and ready", SETTLE, |v| {
        v["generations"][0]["workers"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["index"] == 0))
            .is_some_and(|w| {
                w["restarts"].as_u64() >= Some(1)
                    && w["state"] == "ready"
                    && w["pid"].as_i64().is_some_and(|p| p as i32 != victim)
            })
    });
    let new_pids = worker_pids(&status, 1);
    assert_ne!(new_pids[0], victim, "{status}");
    assert_eq!(
        new_pids[1], pids[1],
        "the other worker is untouched: {status}"
    );
    sup.wait_status("worker 0's queue served", SETTLE, |v| queued_for(v) == 0);
    wait_more_selected(&mut sup, 1, 1_000);

    let report = load.finish();
    println!("worker killed under load:\n{report}");
    report.assert_all_answered_once();
    assert!(
        report.per_worker.get(&(1, 0)).copied().unwrap_or(0) > 0,
        "the restarted worker 0 must have answered: {report}"
    );
    let status = sup.status_json();
    for s in sockets_of(&status, 1) {
        assert_eq!(s["drops"], 0, "kernel drops on a socket: {status}");
    }
    assert_eq!(generation_numbers(&status), vec![1]);

    sup.stop();
    pins.assert_empty_after_stop();
}

#[test]
fn second_concurrent_upgrade_is_refused() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let good = ServiceConfig::echo(2, addr(), &pins, runtime.path());
    let mut sup = Supervisor::start(&net, good.clone());
    sup.wait_settled(1, SETTLE);

    // Workers that need 3 s before they exec the echo worker (same pid, so its
    // READY=1 counts): the first upgrade is slow.
    let mut slow = good.clone();
    slow.command = echo_worker_after(3);
    sup.set_config(slow);

    let out_dir = TempDir::new("sup-first");
    let mut first_cmd = sup.cli(&["upgrade", "--wait", "drained"]);
    first_cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(out_dir.path().join("stdout")).unwrap())
        .stderr(fs::File::create(out_dir.path().join("stderr")).unwrap());
    let mut first = net.spawn(&mut first_cmd);
    sup.wait_status("the first upgrade to be in progress", SETTLE, |v| {
        v["upgrade_in_progress"] == true
    });

    let second = sup.upgrade();
    let still_running = first.try_wait().expect("try_wait").is_none();
    let stderr = text(&second.stderr);
    assert_eq!(
        second.status.code(),
        Some(2),
        "a second upgrade while one runs must be refused with 2\nstdout:\n{}\nstderr:\n{stderr}",
        text(&second.stdout)
    );
    let line = single_error_line(&stderr);
    assert!(line.contains("already in progress"), "{line}");
    assert!(
        still_running,
        "test setup: the first upgrade finished before the second was refused"
    );

    let status = wait_timeout(&mut first, Duration::from_secs(60)).expect("first upgrade hangs");
    let stdout = fs::read_to_string(out_dir.path().join("stdout")).unwrap_or_default();
    let stderr = fs::read_to_string(out_dir.path().join("stderr")).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "the first upgrade must succeed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("flipped") && stdout.contains("drained"),
        "{stdout}"
    );
    // The refused one took no generation number.
    let status = sup.wait_settled(2, SETTLE);
    let workers = net.cmdlines();
    for pid in worker_pids(&status, 2) {
        let cmd = workers.iter().find(|(p, _)| *p == pid).map(|(_, c)| c);
        assert!(
            cmd.is_some_and(|c| c.contains("echo-worker")),
            "worker {pid} should be the exec'd echo worker: {cmd:?}"
        );
    }

    sup.stop();
    pins.assert_empty_after_stop();
}

#[test]
fn invalid_config_on_upgrade_changes_nothing() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let good = ServiceConfig::echo(2, addr(), &pins, runtime.path());
    let mut sup = Supervisor::start(&net, good.clone());
    let status = sup.wait_settled(1, SETTLE);
    let pids = worker_pids(&status, 1);
    let pins_before = pins.entries();

    let load = BackgroundLoad::start(&net, steady_load());
    sup.wait_selected(1, 200, SETTLE);

    let toml = good.to_toml();
    let line_of = |text: &str, needle: &str| -> usize {
        text.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in\n{text}"))
            + 1
    };
    // The bad files are separate from the daemon's own config file, so `status` (which
    // reads the file it is given) keeps working against the good one.
    let bad_dir = TempDir::new("sup-bad");
    let bad_path = bad_dir.path().join("echo.toml");
    let path = bad_path.display().to_string();
    // (what, file contents, what the message must contain besides the file)
    let syntax = toml.replacen("[[listen]]", "[[listen]", 1);
    let unknown = toml.replacen("[[listen]]\n", "[[listen]]\nrecieve_buffer = \"4MiB\"\n", 1);
    let bad_address = toml.replacen(ADDR, "127.0.0.1:99999", 1);
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "syntax error",
            syntax.clone(),
            vec![format!("{path}:{}", line_of(&syntax, "[[listen]"))],
        ),
        (
            "unknown key",
            unknown.clone(),
            vec![
                format!("{path}:{}", line_of(&unknown, "recieve_buffer")),
                "recieve_buffer".into(),
            ],
        ),
        (
            "bad address",
            bad_address.clone(),
            vec![
                format!("{path}:{}", line_of(&bad_address, "99999")),
                "127.0.0.1:99999".into(),
            ],
        ),
        (
            // Valid on its own, but a listener cannot move under a running supervisor:
            // refused by the daemon rather than the CLI.
            "moved listener",
            toml.replacen(ADDR, "127.0.0.1:5301", 1),
            vec![path.clone(), "restart".into()],
        ),
    ];
    // Message defects are collected so every case's "nothing changed" is still checked.
    let mut bad_messages = Vec::new();
    for (what, contents, expected) in cases {
        fs::write(&bad_path, &contents).unwrap();
        let out = output_with_timeout(
            &mut supervisor_command(&net, &[], &["upgrade"], &bad_path),
            Duration::from_secs(60),
        );
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: upgrade must be refused with 2\nconfig:\n{contents}\nstdout:\n{}\nstderr:\n{stderr}",
            text(&out.stdout)
        );
        match try_single_error_line(&stderr) {
            Ok(line) => {
                for e in &expected {
                    if !line.contains(e.as_str()) {
                        bad_messages.push(format!("{what}: {e:?} not in: {line}"));
                    }
                }
            }
            Err(e) => bad_messages.push(format!("{what}: {e}")),
        }
        assert_untouched(&sup, &pins, 1, &pids, None);
        assert_eq!(pins.entries(), pins_before, "{what}: pins changed");
    }

    // Nothing was reserved by the refusals: the next good upgrade is generation 2.
    sup.upgrade_ok();
    sup.wait_settled(2, SETTLE);
    sup.wait_selected(2, 200, SETTLE);

    let report = load.finish();
    println!("refused upgrades under load:\n{report}");
    report.assert_all_answered_once();
    assert_eq!(
        report.per_generation.keys().copied().collect::<Vec<_>>(),
        vec![1, 2],
        "{report}"
    );
    sup.stop();
    pins.assert_empty_after_stop();
    assert!(
        bad_messages.is_empty(),
        "refused upgrades must print one `error:` line naming the file and the line or key:\n{}",
        bad_messages.join("\n")
    );
}

/// A stop while an upgrade asked for by the CLI is still getting ready: the event
/// loop cancels it before the final drain (it used to run untracked beside the
/// stop), the CLI hears that the supervisor stopped first (exit 1, one error
/// line), the daemon exits 0, and nothing of either generation is left: not even
/// what a killed worker started (it used to leave the wrapper's `sleep` behind).
#[test]
fn a_stop_during_a_cli_upgrade_cancels_it_and_leaves_nothing() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let good = ServiceConfig::echo(2, addr(), &pins, runtime.path());
    let mut sup = Supervisor::start(&net, good.clone());
    sup.wait_settled(1, SETTLE);

    // Workers that never report ready, behind a shell wrapper: the upgrade is
    // still waiting for them when the stop comes, and killing them must take the
    // wrapper's `sleep` too.
    let mut slow = good.clone();
    slow.ready_timeout = Some(Duration::from_secs(60));
    slow.command = echo_worker_after(30);
    sup.set_config(slow);
    let mut upgrade_cmd = sup.cli(&["upgrade"]);
    upgrade_cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let upgrade = net.spawn(&mut upgrade_cmd);
    sup.wait_status("the upgrade to be under way", SETTLE, |v| {
        v["upgrade_in_progress"] == true && generation_numbers(v) == vec![1, 2]
    });

    sup.stop();
    let out = upgrade.wait_with_output().expect("the upgrade command");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = single_error_line(&stderr);
    assert!(
        line.contains("stopped before the upgrade finished") || line.contains("went away"),
        "{line}"
    );
    assert!(
        running(&net, "sleep 30").is_empty() && running(&net, "echo-worker").is_empty(),
        "workers left: {:?}",
        net.cmdlines()
    );
    pins.assert_empty_after_stop();
}
