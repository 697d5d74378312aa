//! No fd, map, program, pin or process leaks over 20 upgrades: the supervisor holds the
//! same things after generation 21 took over as it did when generation 1 served.
//!
//! Counted per process (`/proc/<pid>/fd` and `fdinfo`) and per pin directory rather
//! than system-wide, since other tests create maps of the same names in parallel; the
//! socket arrays of the retired generations are followed by id, system-wide, until the
//! kernel has freed them.

#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use supervisor_tests::leaks::{
    FdCensus, map_id_exists, map_in_map_slots, pinned_map_info, relative_entries,
};
use supervisor_tests::{PinDir, ServiceConfig, Supervisor, TempDir, TestNet, require_root};

const UPGRADES: u32 = 20;
const SETTLE: Duration = Duration::from_secs(30);

/// What the supervisor holds while one generation serves.
#[derive(Debug, PartialEq, Eq)]
struct Holdings {
    census: FdCensus,
    /// Pins relative to the pin dir, with the serving generation's `gen-<N>` written
    /// as `gen-*`.
    pins: Vec<String>,
    /// Occupied slots of the listener's `GENERATIONS` map-in-map: inner map ids.
    slots: Vec<u32>,
    /// Processes in the namespace: the supervisor and its workers.
    processes: usize,
}

struct Service<'a> {
    sup: Supervisor<'a>,
    net: &'a TestNet,
    pins: &'a PinDir,
    /// `<pins>/<service>/<listener>`.
    listener_dir: PathBuf,
}

impl Service<'_> {
    fn gen_pin(&self, n: u32) -> PathBuf {
        self.listener_dir.join(format!("gen-{n}"))
    }

    /// The map id of generation `n`'s pinned socket array.
    fn gen_map_id(&self, n: u32) -> u32 {
        let info = pinned_map_info(&self.gen_pin(n))
            .unwrap_or_else(|e| panic!("gen-{n} is not a pinned map: {e}"));
        assert_eq!(info.name, format!("gen_{n}"), "{info:?}");
        info.id
    }

    fn holdings(&self, serving: u32) -> Holdings {
        let pid = self.sup.pid().expect("supervisor running");
        let census = FdCensus::of(pid).expect("read /proc/<supervisor>/fd");
        let current = format!("gen-{serving}");
        let pins = relative_entries(self.pins.path())
            .into_iter()
            .map(|p| match p.strip_suffix(&current) {
                Some(prefix) if prefix.is_empty() || prefix.ends_with('/') => {
                    format!("{prefix}gen-*")
                }
                _ => p,
            })
            .collect();
        let slots = map_in_map_slots(&self.listener_dir.join("generations"))
            .expect("read the GENERATIONS slots")
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        Holdings {
            census,
            pins,
            slots,
            processes: self.net.pids().len(),
        }
    }

    /// The holdings once they stop changing (a just-closed CLI connection may still be
    /// open on the daemon's side for a moment).
    fn settled_holdings(&self, serving: u32) -> Holdings {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.holdings(serving);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.holdings(serving);
            if now == last || Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }
}

#[test]
fn no_leaks_after_twenty_upgrades() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let addr: SocketAddr = "127.0.0.1:5300".parse().unwrap();
    let config = ServiceConfig::echo(2, addr, &pins, runtime.path());
    let listener_dir = pins.path().join(&config.name).join(&config.listen_name);
    let mut sup = Supervisor::start(&net, config);
    sup.wait_settled(1, SETTLE);
    let mut svc = Service {
        sup,
        net: &net,
        pins: &pins,
        listener_dir,
    };

    let before = svc.settled_holdings(1);
    let first_map = svc.gen_map_id(1);
    println!("before: {before:#?}");
    assert!(
        before.pins.contains(&"echo/echo/gen-*".to_string()),
        "the layout is <bpffs>/<service>/<listener>/gen-<N>: {:?}",
        before.pins
    );
    assert_eq!(
        before.slots,
        vec![first_map],
        "one slot, generation 1's array"
    );
    assert!(
        before.census.map_ids.contains(&first_map),
        "the supervisor holds generation 1's array: {before:?}"
    );

    let mut retired = vec![first_map];
    for target in 2..=1 + UPGRADES {
        svc.sup.upgrade_ok();
        assert!(
            !svc.gen_pin(target - 1).exists(),
            "gen-{} still pinned",
            target - 1
        );
        retired.push(svc.gen_map_id(target));
    }
    let last = 1 + UPGRADES;
    let current_map = retired.pop().unwrap();
    svc.sup.wait_settled(last, SETTLE);

    // Poll until equal (or the deadline): the last retirement's closes may still run.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = svc.holdings(last);
        let same = after.census.kinds == before.census.kinds
            && after.pins == before.pins
            && after.processes == before.processes
            && after.slots == vec![current_map];
        if same || Instant::now() >= deadline {
            break after;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("after {UPGRADES} upgrades: {after:#?}");

    assert_eq!(
        after.census.kinds,
        before.census.kinds,
        "the supervisor's open fds by kind changed over {UPGRADES} upgrades ({} -> {} fds)",
        before.census.total(),
        after.census.total()
    );
    assert_eq!(
        after.census.prog_ids, before.census.prog_ids,
        "BPF programs held by the supervisor changed"
    );
    assert_eq!(
        after.census.link_ids, before.census.link_ids,
        "BPF links held by the supervisor changed"
    );
    let without = |ids: &BTreeSet<u32>, gen_map: u32| -> BTreeSet<u32> {
        ids.iter().copied().filter(|&id| id != gen_map).collect()
    };
    assert!(
        after.census.map_ids.contains(&current_map),
        "the supervisor holds the serving generation's array"
    );
    assert_eq!(
        without(&after.census.map_ids, current_map),
        without(&before.census.map_ids, first_map),
        "BPF maps held by the supervisor (besides the serving generation's array) changed"
    );
    assert_eq!(
        after.pins, before.pins,
        "pins differ (gen-1 vs gen-{last} written as gen-*)"
    );
    assert_eq!(
        after.slots,
        vec![current_map],
        "GENERATIONS must hold only the serving generation's array"
    );
    assert_eq!(
        after.processes,
        before.processes,
        "processes in the namespace (supervisor + workers): {:?}",
        net.cmdlines()
    );

    // Every retired generation's socket array is gone from the kernel, not just unpinned
    // (freeing is deferred, so allow a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    let alive = loop {
        let alive: Vec<(usize, u32)> = retired
            .iter()
            .enumerate()
            .filter(|&(_, &id)| map_id_exists(id).expect("BPF_MAP_GET_FD_BY_ID"))
            .map(|(i, &id)| (i + 1, id))
            .collect();
        if alive.is_empty() || Instant::now() >= deadline {
            break alive;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        alive.is_empty(),
        "socket arrays of retired generations still exist (generation, map id): {alive:?}"
    );

    svc.sup.stop();
    pins.assert_empty_after_stop();
}
