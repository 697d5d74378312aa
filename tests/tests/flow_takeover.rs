//! The `flow` mode across what replaces or restarts the supervisor: a crash that
//! lasts longer than `flow_idle`, re-execs into another selector build, and the
//! flow-table size the loaded selector sees on each path.

#![deny(unsafe_code)]

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use supervisor_tests::stateful::{self, ClientLog, client};
use supervisor_tests::{
    PinDir, ServiceConfig, Supervisor, TempDir, TestNet, bin_path, require_root,
    selector_variant_path,
};

/// The tests' service: `stateful::config` in `flow` mode on 127.0.0.1:`port`.
fn flow_config(
    net: &TestNet,
    pins: &PinDir,
    run: &TempDir,
    port: u16,
    extra: &str,
) -> ServiceConfig {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    stateful::config("fcr", net.name(), address, "flow", pins, run, extra)
}

/// Every busy client got all its replies from the worker it started on.
fn assert_busy_clients_stayed(supervisor: &Supervisor<'_>, busy: &[ClientLog]) {
    println!("selector: {}", supervisor.status_json()["selectors"][0]);
    for (i, log) in busy.iter().enumerate() {
        println!(
            "busy client {i}: {} replies, {} lost, changes: {:?}",
            log.replies.len(),
            log.lost,
            log.moves()
        );
    }
    for (i, log) in busy.iter().enumerate() {
        assert_eq!(log.lost, 0, "busy client {i} lost datagrams");
        assert_eq!(
            log.moves().len(),
            1,
            "busy client {i} moved between workers: {:?}",
            log.moves()
        );
    }
}

/// A client that never stops talking keeps its worker while the supervisor is
/// down for longer than `flow_idle`: its flow was never idle.
///
/// While no supervisor runs, the clock word (`CONTROL[CLOCK_MS]`) stands still,
/// so no entry's `last_seen_ms` is refreshed (its age never reaches
/// `flow_idle / 4`). A supervisor that took over used to store the real time
/// again, so every flow's age jumped by the downtime and all expired at once
/// (`expired` counted both clients); it now resumes the clock where it stood.
#[test]
fn busy_flow_keeps_its_worker_when_the_supervisor_is_down_longer_than_flow_idle() {
    busy_flows_keep_their_worker_across_a_crash(Duration::from_secs(2), Duration::from_secs(3));
}

fn busy_flows_keep_their_worker_across_a_crash(flow_idle: Duration, down: Duration) {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("fcr-down");
    let mut config = flow_config(&net, &pins, &run, 5410, "");
    config.flow_idle = Some(flow_idle);
    let target = config.address;
    let mut supervisor = Supervisor::start(&net, config);
    let stop = Arc::new(AtomicBool::new(false));
    let busy = net.run_in(|| {
        thread::scope(|scope| {
            let busy: Vec<_> = (0..2)
                .map(|_| {
                    let stop = stop.clone();
                    scope.spawn(move || {
                        client(target, u64::MAX, Duration::from_millis(5), false, stop)
                    })
                })
                .collect();
            thread::sleep(Duration::from_millis(500));
            supervisor.kill9();
            // Down for `down` while the clients keep talking.
            let killed = std::time::Instant::now();
            thread::sleep(down);
            supervisor.restart_same_config(&[]);
            println!("down for {:?} (until status answered)", killed.elapsed());
            thread::sleep(Duration::from_secs(1));
            stop.store(true, Ordering::Relaxed);
            busy.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    });
    assert_busy_clients_stayed(&supervisor, &busy);
    supervisor.stop();
    pins.assert_empty_after_stop();
}

/// The kernel's id of the selector program pinned in `dir`.
fn program_id(dir: &Path) -> u64 {
    let show = Command::new("bpftool")
        .args(["-j", "prog", "show", "pinned"])
        .arg(dir.join("selector"))
        .output()
        .expect("bpftool (installed by scripts/bootstrap.sh)");
    let prog: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    prog["id"].as_u64().expect("a program id")
}

/// The selector program pinned in `dir`'s read-only data, as bpftool shows it.
fn rodata(dir: &Path) -> String {
    let show = Command::new("bpftool")
        .args(["-j", "prog", "show", "pinned"])
        .arg(dir.join("selector"))
        .output()
        .expect("bpftool (installed by scripts/bootstrap.sh)");
    assert!(show.status.success(), "bpftool prog show: {show:?}");
    let prog: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let mut found = Vec::new();
    for id in prog["map_ids"].as_array().expect("map_ids") {
        let id = id.as_u64().unwrap().to_string();
        let map = Command::new("bpftool")
            .args(["-j", "map", "show", "id", &id])
            .output()
            .unwrap();
        let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        if map["name"].as_str().unwrap_or("").contains("rodata") {
            let dump = Command::new("bpftool")
                .args(["-j", "map", "dump", "id", &id])
                .output()
                .unwrap();
            found.push(String::from_utf8_lossy(&dump.stdout).into_owned());
        }
    }
    assert!(!found.is_empty(), "no .rodata map in the selector's maps");
    found.join("\n")
}

/// `FLOW_TABLE_SIZE` = 64 as bpftool dumps the selector's `.rodata` (the global is
/// its only read-only data; no BTF formatting is shown for it).
const SIZE_64: &str = "\"value\":[\"0x40\",\"0x00\",\"0x00\",\"0x00\"]";

/// Every path that loads the selector sets `FLOW_TABLE_SIZE` to the table's
/// size: the first start and the re-exec into another selector build.
#[test]
fn flow_table_size_global_matches_the_table_after_start_and_selector_swap() {
    require_root();
    let variant = selector_variant_path();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("fcr-global");
    let config = flow_config(&net, &pins, &run, 5411, "flow_table_size = 64");
    let dir = pins.path().join(&config.name).join(&config.listen_name);
    let mut supervisor = Supervisor::start(&net, config);
    let first_id = program_id(&dir);
    let first = rodata(&dir);
    println!("after start: {first}");
    assert!(first.contains(SIZE_64), "after start: {first}");
    supervisor.reexec_into(&variant);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while program_id(&dir) == first_id {
        assert!(
            std::time::Instant::now() < deadline,
            "the selector was not swapped"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let swapped = rodata(&dir);
    println!("after the swap: {swapped}");
    assert!(swapped.contains(SIZE_64), "after the swap: {swapped}");
    supervisor.stop();
    pins.assert_empty_after_stop();
}

/// Busy flows keep their worker while the supervisor re-execs into another
/// selector build (`selector-variant`) and back: the flow table is reused (its
/// key layout is the same), and the new program's empty cache is only a cache.
#[test]
fn busy_flows_keep_their_worker_across_selector_swaps() {
    require_root();
    let variant = selector_variant_path();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("fcr-swap");
    let config = flow_config(&net, &pins, &run, 5412, "flow_table_size = 64");
    let target = config.address;
    let dir = pins.path().join(&config.name).join(&config.listen_name);
    let mut supervisor = Supervisor::start(&net, config);
    let original = program_id(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let busy = net.run_in(|| {
        thread::scope(|scope| {
            let busy: Vec<_> = (0..4)
                .map(|_| {
                    let stop = stop.clone();
                    scope.spawn(move || {
                        client(target, u64::MAX, Duration::from_millis(2), false, stop)
                    })
                })
                .collect();
            let mut last = original;
            for binary in [variant.clone(), bin_path("supervisor")] {
                thread::sleep(Duration::from_millis(500));
                supervisor.reexec_into(&binary);
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while program_id(&dir) == last {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{} did not swap the selector",
                        binary.display()
                    );
                    thread::sleep(Duration::from_millis(50));
                }
                last = program_id(&dir);
            }
            thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::Relaxed);
            busy.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    });
    assert_busy_clients_stayed(&supervisor, &busy);
    supervisor.stop();
    pins.assert_empty_after_stop();
}
