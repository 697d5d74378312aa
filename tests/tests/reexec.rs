//! `supervisor reexec`: the supervisor replaces its own process image (a new
//! supervisor build) while its workers keep serving: same pid, same workers, same
//! sockets and pins, nothing lost, and everything still works afterwards.

#![deny(unsafe_code)]

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use supervisor_tests::supervisor::worker_pids;
use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, bin_path,
    require_root,
};

#[test]
fn reexec_keeps_workers_and_traffic() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("reexec");
    let config = ServiceConfig::echo(3, "127.0.0.1:6000".parse().unwrap(), &pins, run.path());
    let target = config.address;
    let mut supervisor = Supervisor::start(&net, config);
    let before = supervisor.status_json();
    let pins_before: Vec<_> = pins.entries();

    let mut load = LoadConfig::new(target);
    load.rate = Some(4000);
    load.duration = Some(Duration::from_secs(4));
    let background = BackgroundLoad::start(&net, load);
    std::thread::sleep(Duration::from_millis(500));

    // Twice: the adopted image must itself be able to hand over.
    for round in 0..2 {
        let output = supervisor
            .cli(&[
                "reexec",
                "--binary",
                &bin_path("supervisor").to_string_lossy(),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "re-exec {round} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("re-exec succeeded"), "{stdout}");
    }
    let after = supervisor.status_json();
    assert_eq!(after["pid"], before["pid"], "the supervisor's pid changed");
    assert_ne!(
        after["image_started_unix_ms"], before["image_started_unix_ms"],
        "no new image"
    );
    assert_eq!(
        worker_pids(&after, 1),
        worker_pids(&before, 1),
        "workers were replaced"
    );
    assert_eq!(pins.entries(), pins_before, "pins changed");
    let report = background.finish();
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.duplicated, 0, "{report}");
    assert_eq!(report.per_generation.len(), 1, "{report}");

    // An adopted worker that dies is restarted on its socket. (Outside the load:
    // a worker killed in the middle of recv() takes the datagram it had just
    // dequeued with it, which no supervisor can prevent.)
    let victim = worker_pids(&after, 1)[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let restarted = supervisor.wait_status("worker 0 restarted", Duration::from_secs(10), |s| {
        let w = &s["generations"][0]["workers"][0];
        w["restarts"].as_u64() == Some(1)
            && w["pid"].as_i64().is_some_and(|p| p != i64::from(victim))
            && w["state"] == "ready"
    });
    assert_eq!(restarted["generations"][0]["generation"], 1);

    // An upgrade drains the adopted generation like any other.
    supervisor.upgrade_ok();
    assert_eq!(supervisor.serving_generation(), 2);

    // A refused re-exec changes nothing.
    let output = supervisor
        .cli(&["reexec", "--binary", "/nonexistent/supervisor"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not an executable"));
    assert_eq!(supervisor.serving_generation(), 2);

    supervisor.stop();
    pins.assert_empty_after_stop();
}
