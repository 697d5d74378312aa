//! A generation of echo workers answers every datagram exactly once, whether the worker
//! uses the worker SDK (Rust) or only speaks the socket-activation protocol (python).

#![deny(unsafe_code)]

use std::net::SocketAddr;

use supervisor_tests::{
    LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, loadgen, python_worker_path,
    python3_path, require_root,
};

const ADDR: &str = "127.0.0.1:5300";

/// Starts `config`, sends `count` datagrams, checks each was answered once by the serving
/// generation with every worker present in status, then stops cleanly.
fn serve_and_check(config: impl FnOnce(&PinDir, &TempDir) -> ServiceConfig, count: u64) {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let config = config(&pins, &runtime);
    let (addr, workers) = (config.address, config.workers);
    let mut sup = Supervisor::start(&net, config);
    let generation = sup.serving_generation();

    let status = sup.status_json();
    let serving = supervisor_tests::supervisor::serving_generation(&status).unwrap();
    let listed = serving["workers"].as_array().map_or(0, |w| w.len());
    assert_eq!(
        listed, workers as usize,
        "status lists every worker: {status}"
    );

    let report = net
        .run_in(|| loadgen::run(&LoadConfig::new(addr).count(count).rate(5_000)))
        .expect("load generator");
    println!("{report}");
    report.assert_all_answered_once();
    assert_eq!(report.sent, count);
    assert_eq!(
        report.per_generation.keys().copied().collect::<Vec<_>>(),
        vec![generation],
        "{report}"
    );

    sup.stop();
    pins.assert_empty_after_stop();
}

#[test]
fn generation_serves_echo() {
    serve_and_check(
        |pins, rt| ServiceConfig::echo(2, ADDR.parse::<SocketAddr>().unwrap(), pins, rt.path()),
        1_000,
    );
}

#[test]
fn python_socket_activation_worker_serves() {
    serve_and_check(
        |pins, rt| {
            let argv = vec![
                python3_path().to_string_lossy().into_owned(),
                python_worker_path().to_string_lossy().into_owned(),
            ];
            // No ReadyMode set: the default, READY=1 over NOTIFY_SOCKET, which the python
            // worker sends itself with no supervisor library. The interpreter is exec'd by
            // its real path, so the sender of READY=1 is the worker's own pid.
            ServiceConfig::new("pyecho", argv, 2, ADDR.parse().unwrap(), pins, rt.path())
        },
        1_000,
    );
}
