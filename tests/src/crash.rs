//! What a test of a supervisor crash looks at: the state file the daemon keeps in its
//! runtime directory, what is left there, and whether the processes, sockets and pins
//! in the namespace are exactly those `status` lists (nothing leaked, nothing lost).
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::supervisor::{generation_numbers, sockets_of};
use crate::{PinDir, ServiceConfig, TestNet};

/// Whether `pid` runs (a zombie does not: a killed worker stays one until its
/// parent reaps it, and the workers of a dead supervisor are reparented, and their
/// new parent may reap them late).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // pid (comm) STATE ...: comm may hold spaces and parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Waits (up to 10 s) until `pid` no longer runs: `kill` returns before a SIGKILLed
/// process is gone, and until then it may still take a datagram off its socket.
pub fn wait_dead(pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} still runs 10 s after it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// `<runtime_dir>/<name>.state.json`: where the daemon records its state at every
/// transition (the file a restarted daemon adopts from).
pub fn state_file(config: &ServiceConfig) -> PathBuf {
    config
        .runtime_dir
        .join(format!("{}.state.json", config.name))
}

/// Names of the entries of `dir` (sorted; empty if it does not exist).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Generation numbers that have a `gen-N` socket-array pin under any listener.
pub fn pinned_generations(pins: &PinDir) -> BTreeSet<u32> {
    pins.entries()
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.strip_prefix("gen-")?.parse().ok())
        .collect()
}

/// Inodes of the UDP sockets bound to `port` in `net` (from the namespace's
/// `/proc/net/udp` and `udp6`, read on a thread inside it).
pub fn bound_udp_inodes(net: &TestNet, port: u16) -> BTreeSet<u64> {
    let wanted = format!("{port:04X}");
    net.run_in(move || {
        let mut inodes = BTreeSet::new();
        for table in ["udp", "udp6"] {
            let text = fs::read_to_string(format!("/proc/thread-self/net/{table}"))
                .unwrap_or_else(|e| panic!("read /proc/thread-self/net/{table}: {e}"));
            for line in text.lines().skip(1) {
                // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                let fields: Vec<&str> = line.split_whitespace().collect();
                let Some(local) = fields.get(1) else { continue };
                let local_port = local.rsplit(':').next().unwrap_or("");
                if local_port == wanted
                    && let Some(inode) = fields.get(9).and_then(|i| i.parse().ok())
                {
                    inodes.insert(inode);
                }
            }
        }
        inodes
    })
}

/// Socket inodes among `pid`'s open fds (empty if the process is gone).
pub fn socket_inodes_of(pid: i32) -> BTreeSet<u64> {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    rd.flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Pids of the workers of every generation in a status, with their generation.
pub fn all_worker_pids(status: &Value) -> BTreeMap<i32, u32> {
    let mut out = BTreeMap::new();
    for g in status["generations"].as_array().into_iter().flatten() {
        let generation = g["generation"].as_u64().unwrap_or(0) as u32;
        for w in g["workers"].as_array().into_iter().flatten() {
            if let Some(pid) = w["pid"].as_i64() {
                out.insert(pid as i32, generation);
            }
        }
    }
    out
}

/// One consistent state after an adoption: exactly one generation serves; the
/// `gen-N` pins are those of the listed generations; the processes in the namespace
/// are the daemon and the workers `status` lists, nothing else; the UDP sockets bound
/// to the service's port are exactly as many as `status` lists, each held by the
/// daemon (its own reference) and by one listed worker. Panics with the details.
pub fn assert_consistent(net: &TestNet, pins: &PinDir, config: &ServiceConfig, status: &Value) {
    let serving: Vec<&Value> = status["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["state"] == "serving")
        .collect();
    assert_eq!(serving.len(), 1, "one serving generation: {status}");
    let listed: BTreeSet<u32> = generation_numbers(status).into_iter().collect();
    assert_eq!(
        pinned_generations(pins),
        listed,
        "gen-N pins vs generations in status: {status}\npins: {:?}",
        pins.entries()
    );

    let daemon = status["pid"].as_i64().expect("status has the daemon's pid") as i32;
    let workers = all_worker_pids(status);
    let in_netns: BTreeSet<i32> = net.pids().into_iter().collect();
    let expected: BTreeSet<i32> = workers.keys().copied().chain([daemon]).collect();
    assert_eq!(
        in_netns,
        expected,
        "processes in the namespace vs the daemon and its listed workers: {:?}\nstatus: {status}",
        net.cmdlines()
    );

    let listed_sockets: usize = listed.iter().map(|&g| sockets_of(status, g).len()).sum();
    let bound = bound_udp_inodes(net, config.address.port());
    assert_eq!(
        bound.len(),
        listed_sockets,
        "UDP sockets bound to port {} vs sockets in status: {status}",
        config.address.port()
    );
    let daemon_holds = socket_inodes_of(daemon);
    let missing: Vec<&u64> = bound.difference(&daemon_holds).collect();
    assert!(
        missing.is_empty(),
        "the daemon holds no reference to the sockets with inodes {missing:?}"
    );
    for inode in &bound {
        let holders: Vec<i32> = workers
            .keys()
            .copied()
            .filter(|&pid| socket_inodes_of(pid).contains(inode))
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "socket inode {inode} must be held by exactly one listed worker, held by {holders:?}: {status}"
        );
    }
}
