//! `hash` balance mode: the 4-tuple decides the worker, so a flow sticks to one worker and
//! several flows spread.

#![deny(unsafe_code)]

use std::net::SocketAddr;

use supervisor_tests::{
    Balance, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, loadgen, require_root,
};

#[test]
fn hash_mode_keeps_a_flow_on_one_socket() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let addr: SocketAddr = "127.0.0.1:5300".parse().unwrap();
    let mut sup = Supervisor::start(
        &net,
        ServiceConfig::echo(4, addr, &pins, runtime.path()).balance(Balance::Hash),
    );

    let one = net
        .run_in(|| loadgen::run(&LoadConfig::new(addr).count(2_000).rate(5_000)))
        .expect("load generator");
    println!("hash, one sender:\n{one}");
    one.assert_all_answered_once();
    assert_eq!(one.per_worker.len(), 1, "one flow, one worker: {one}");

    let eight = net
        .run_in(|| loadgen::run(&LoadConfig::new(addr).senders(8).count(8_000).rate(8_000)))
        .expect("load generator");
    println!("hash, eight senders:\n{eight}");
    eight.assert_all_answered_once();
    for s in &eight.per_sender {
        assert_eq!(
            s.per_worker.len(),
            1,
            "flow from {} must stay on one worker: {:?}",
            s.local,
            s.per_worker
        );
    }
    // Eight random source ports all hashing onto the same one of four workers has
    // probability 4 * (1/4)^8, about 6e-5: small enough not to make this flaky.
    assert!(eight.per_worker.len() > 1, "eight flows spread: {eight}");

    sup.stop();
    pins.assert_empty_after_stop();
}
