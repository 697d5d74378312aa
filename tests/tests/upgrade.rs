//! Zero-loss upgrades under a steady load from a separate sender: every datagram sent
//! across many upgrades in a row is answered exactly once, whether the workers drain
//! with a read deadline (the Rust echo worker) or exit at once on SIGTERM (the python
//! socket-activation worker); and SIGHUP to the daemon upgrades the same way.

#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;
use supervisor_tests::supervisor::generation_numbers;
use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet,
    python_worker_path, python3_path, require_root,
};

const ADDR: &str = "127.0.0.1:5300";
/// Total datagrams per second of the steady load: far below what two workers handle on
/// this machine, so any loss is the supervisor's.
const RATE: u64 = 4_000;
/// How long a status poll may wait for something that takes well under a second.
const SETTLE: Duration = Duration::from_secs(30);

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

/// Two sending sockets at [`RATE`] in total, running until stopped, with time for the
/// last replies.
fn steady_load() -> LoadConfig {
    LoadConfig::new(addr())
        .senders(2)
        .rate(RATE)
        .grace(Duration::from_secs(3))
}

/// Starts `config`, runs `upgrades` upgrades in a row under the steady load, and checks
/// that nothing was lost or doubled and that every generation answered.
fn upgrades_under_load(config: ServiceConfig, upgrades: u32, net: &TestNet, pins: &PinDir) {
    let mut sup = Supervisor::start(net, config);
    sup.wait_settled(1, SETTLE);

    let load = BackgroundLoad::start(net, steady_load());
    sup.wait_selected(1, 200, SETTLE);
    for i in 0..upgrades {
        let target = 2 + i;
        let out = sup.upgrade_ok();
        assert!(
            out.contains(&format!("generation {target}")),
            "upgrade {} should build generation {target}:\n{out}",
            i + 1
        );
        let status = sup.status_json();
        assert_eq!(
            generation_numbers(&status),
            vec![target],
            "after `upgrade` returned, only generation {target} is left: {status}"
        );
        assert_eq!(sup.serving_generation(), target);
        // Every generation must really serve before the next replaces it.
        sup.wait_selected(target, 200, SETTLE);
    }
    let last = 1 + upgrades;
    sup.wait_selected(last, 1_000, SETTLE);
    assert!(!load.is_finished(), "the load generator stopped early");
    let report = load.finish();
    println!("{upgrades} upgrades under load:\n{report}");

    report.assert_all_answered_once();
    assert_eq!(
        report.refused, 0,
        "ICMP port unreachable seen: at some moment nothing was bound: {report}"
    );
    let generations: BTreeSet<u32> = report.per_generation.keys().copied().collect();
    assert_eq!(
        generations,
        (1..=last).collect::<BTreeSet<u32>>(),
        "replies must come from every generation 1..={last}: {report}"
    );
    assert_eq!(sup.serving_generation(), last);

    sup.stop();
    pins.assert_empty_after_stop();
}

#[test]
fn twenty_upgrades_under_load_lose_nothing() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let config = ServiceConfig::echo(2, addr(), &pins, runtime.path());
    upgrades_under_load(config, 20, &net, &pins);
}

#[test]
fn python_worker_upgrades_under_load_lose_nothing() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let argv = vec![
        python3_path().to_string_lossy().into_owned(),
        python_worker_path().to_string_lossy().into_owned(),
    ];
    // The python worker keeps SIGTERM's default action: it dies at once, so only the
    // supervisor's wait for empty receive queues before the signal saves the datagrams.
    let config = ServiceConfig::new("pyecho", argv, 2, addr(), &pins, runtime.path());
    upgrades_under_load(config, 20, &net, &pins);
}

#[test]
fn sighup_upgrades_like_the_cli() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let mut sup = Supervisor::start(&net, ServiceConfig::echo(2, addr(), &pins, runtime.path()));
    sup.wait_settled(1, SETTLE);

    let load = BackgroundLoad::start(&net, steady_load());
    sup.wait_selected(1, 200, SETTLE);
    for target in [2, 3] {
        sup.signal(Signal::SIGHUP);
        sup.wait_settled(target, SETTLE);
        sup.wait_selected(target, 500, SETTLE);
    }
    let report = load.finish();
    println!("two SIGHUP upgrades under load:\n{report}");
    report.assert_all_answered_once();
    assert_eq!(report.refused, 0, "{report}");
    assert_eq!(
        report.per_generation.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{report}"
    );
    assert_eq!(sup.serving_generation(), 3);

    sup.stop();
    pins.assert_empty_after_stop();
}
