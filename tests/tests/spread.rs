//! The point of the `random` balance mode: one sender's datagrams spread over every
//! worker, where plain SO_REUSEPORT puts them all on one socket.

#![deny(unsafe_code)]

use std::net::SocketAddr;

use supervisor_tests::plain::{assert_one_socket_got_all, format_counts, run_plain_baseline};
use supervisor_tests::{
    Balance, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, loadgen, require_root,
};

#[test]
fn random_mode_spreads_one_sender_over_all_workers() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let addr: SocketAddr = "127.0.0.1:5300".parse().unwrap();
    let mut sup = Supervisor::start(
        &net,
        ServiceConfig::echo(4, addr, &pins, runtime.path()).balance(Balance::Random),
    );
    let generation = sup.serving_generation();

    // Moderate rate: 10k/s over four workers is far below what one worker handles, so a
    // loss here would be a real defect, not an overloaded machine.
    let report = net
        .run_in(|| loadgen::run(&LoadConfig::new(addr).count(40_000).rate(10_000)))
        .expect("load generator");
    // The same kind of sender against a plain reuseport group in the same namespace.
    let (plain, plain_report) =
        run_plain_baseline(&net, "127.0.0.1:5301".parse().unwrap(), 4, 20_000, 20_000);

    println!("supervisor, balance = random, one sender:\n{report}");
    println!(
        "plain SO_REUSEPORT, one sender:\n{}{plain_report}",
        format_counts(&plain)
    );

    report.assert_all_answered_once();
    assert_eq!(report.sent, 40_000);
    assert_eq!(
        report.per_generation.keys().copied().collect::<Vec<_>>(),
        vec![generation],
        "only the serving generation answers: {report}"
    );
    assert_eq!(report.per_worker.len(), 4, "every worker answers: {report}");
    for w in 0..4u16 {
        // Even spread is 25%; 10% leaves room for an unlucky random sequence while still
        // failing any per-flow (hash-like) placement, which gives 100% / 0%.
        let share = report.share(generation, w);
        assert!(
            share >= 0.10,
            "worker {w} got {:.1}% of one sender's traffic: {report}",
            share * 100.0
        );
    }

    // The contrast: without the selector, the same sender lands on one socket.
    assert_one_socket_got_all(&plain, plain_report.sent);

    sup.stop();
    pins.assert_empty_after_stop();
}
