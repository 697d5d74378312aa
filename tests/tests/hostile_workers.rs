//! What a worker can do to the supervisor and to the host, and what it cannot
//! (issue 12): a worker that floods the notify socket does not grow the daemon;
//! fds the supervisor's launcher left open do not reach workers; a worker running
//! as `user` has no capabilities, an empty bounding set and `no_new_privs`.
//!
//! Bounds are on memory and fd counts, with wide margins, never on time.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use supervisor_tests::World;
use supervisor_tests::pressure::{
    open_fds, proc_status, python3_for_any_user, reset_peak_rss, status_kib,
};
use supervisor_tests::supervisor::worker_pids;
use supervisor_tests::{ServiceConfig, Supervisor, TempDir};

/// A service of `workers` running `command`, in `w`'s world.
fn service(w: &World, name: &str, command: Vec<String>, workers: u32) -> ServiceConfig {
    ServiceConfig::new(
        name,
        command,
        workers,
        World::addr(),
        &w.pins,
        w.runtime.path(),
    )
}

/// Worker: READY=1, then on a datagram `flood N` sends N `STATUS=` messages of
/// about 4 KB from 4 threads, as fast as the notify socket takes them, then
/// `STATUS=done N`, and answers `done`. (Several senders keep the socket full, so
/// the daemon always has more to read.)
const FLOOD_WORKER: &str = r#"
import os, socket, threading
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.connect(address)
notify.send(b"READY=1")
sock = socket.socket(fileno=3)
pad = b"x" * 4000
def send(first, count):
    for i in range(first, first + count):
        notify.send(b"STATUS=flood %d " % i + pad)
while True:
    data, peer = sock.recvfrom(100)
    words = data.split()
    if len(words) == 2 and words[0] == b"flood":
        count = int(words[1])
        threads = [threading.Thread(target=send, args=(t * count // 4, count // 4)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        notify.send(b"STATUS=done %d" % count)
        sock.sendto(b"done", peer)
"#;

/// Messages the flooding worker sends: about 800 MB of `STATUS=` lines.
const FLOOD_MESSAGES: u64 = 200_000;
/// How much the daemon's peak RSS may grow while it is flooded (it holds one
/// status line per worker, whatever the worker sends).
const FLOOD_RSS_GROWTH_KIB: u64 = 64 * 1024;

/// Issue 12, item 1: a worker running as `nobody` that sends hundreds of
/// thousands of 4 KB `STATUS=` messages does not grow the supervisor (it grew to
/// 3.35 GB and kept it), which answers `status` during the flood, keeps the
/// latest status line, and upgrades afterwards.
#[test]
fn notify_flood_does_not_grow_the_supervisor() {
    let w = World::new();
    let python = python3_for_any_user();
    let config = service(
        &w,
        "flood",
        vec![
            python.to_string_lossy().into_owned(),
            "-c".into(),
            FLOOD_WORKER.into(),
        ],
        1,
    )
    .service_key("user", "nobody");
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, Duration::from_secs(30));
    let pid = sup.pid().unwrap();
    reset_peak_rss(pid);
    let before = status_kib(pid, "VmRSS");

    let client = w.net.run_in(|| UdpSocket::bind("127.0.0.1:0").unwrap());
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    client
        .send_to(format!("flood {FLOOD_MESSAGES}").as_bytes(), World::addr())
        .unwrap();
    // The daemon must keep answering while it is flooded.
    let mut answered_during_flood = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut reply = [0u8; 16];
    loop {
        match client.recv(&mut reply) {
            Ok(n) => {
                assert_eq!(&reply[..n], b"done");
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("waiting for the flooding worker: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not finish its flood"
        );
        sup.status_json();
        answered_during_flood += 1;
    }
    let peak = status_kib(pid, "VmHWM");
    let after = status_kib(pid, "VmRSS");
    println!(
        "supervisor RSS: {before} KiB before, peak {peak} KiB during {FLOOD_MESSAGES} messages, \
         {after} KiB after; {answered_during_flood} status calls answered during the flood"
    );
    assert!(
        peak < before + FLOOD_RSS_GROWTH_KIB,
        "the supervisor grew from {before} KiB to a peak of {peak} KiB under a notify flood"
    );

    // The flood is logged, a few lines, not one per message.
    let warnings = sup
        .logs()
        .1
        .lines()
        .filter(|l| l.contains("notify messages"))
        .count();
    assert!(
        (1..=20).contains(&warnings),
        "expected a few warnings about the flood, got {warnings}"
    );

    // The latest status line is kept, whatever came before it.
    let done = format!("done {FLOOD_MESSAGES}");
    sup.wait_status("the worker's last STATUS=", Duration::from_secs(60), |v| {
        v["generations"][0]["workers"][0]["status"] == done.as_str()
    });
    sup.upgrade_ok();
    sup.wait_settled(2, Duration::from_secs(30));
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// Issue 12, item 8: fds the supervisor's launcher left open (a file and a
/// flock'd lock, without close-on-exec) do not reach the workers: a worker has
/// 0, 1, 2 and its sockets, nothing else.
#[test]
fn workers_get_only_standard_streams_and_their_sockets() {
    let w = World::new();
    let lock_dir = TempDir::new("sup-lock");
    let lock = lock_dir.path().join("held.lock");
    let script = format!(
        "exec 7</etc/hostname 8>>{lock} && flock 8 && exec \"$@\"",
        lock = lock.display()
    );
    let config = service(&w, "fds", vec!["/bin/sleep".into(), "3600".into()], 2)
        .sockets_per_worker(2)
        .ready(supervisor_tests::ReadyMode::Exec);
    let mut sup = Supervisor::start_wrapped(&w.net, config, &["bash", "-c", &script, "bash"]);
    let status = sup.wait_settled(1, Duration::from_secs(30));

    // The launcher's fds did reach the supervisor, or this test would prove nothing.
    let daemon_fds = open_fds(sup.pid().unwrap());
    for (fd, target) in [
        (7, "/etc/hostname".to_string()),
        (8, lock.display().to_string()),
    ] {
        assert!(
            daemon_fds.contains(&(fd, target.clone())),
            "the supervisor should have inherited fd {fd} -> {target}: {daemon_fds:?}"
        );
    }

    let pids = worker_pids(&status, 1);
    assert_eq!(pids.len(), 2, "{status}");
    for pid in pids {
        let fds = open_fds(pid as u32);
        let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
        assert_eq!(
            numbers,
            vec![0, 1, 2, 3, 4],
            "worker {pid} must have fds 0-2 and its 2 sockets, nothing else: {fds:?}"
        );
        for (fd, target) in &fds[3..] {
            assert!(
                target.starts_with("socket:"),
                "worker {pid}: fd {fd} is {target}, not a socket"
            );
        }
    }
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// `(CapBnd, CapEff, CapPrm, CapInh, CapAmb, NoNewPrivs, real uid)` of `pid`.
fn privileges(pid: i32) -> [String; 7] {
    let status = proc_status(pid as u32);
    let field = |k: &str| {
        status
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/status"))
            .clone()
    };
    let uid = field("Uid").split_whitespace().next().unwrap().to_string();
    [
        field("CapBnd"),
        field("CapEff"),
        field("CapPrm"),
        field("CapInh"),
        field("CapAmb"),
        field("NoNewPrivs"),
        uid,
    ]
}

const NO_CAPS: &str = "0000000000000000";

/// Issue 12, item 10: a worker running as `user` has no capabilities, an empty
/// bounding set and `no_new_privs`; `no_new_privs = false` gives setuid helpers
/// back (no flag, bounding set kept); root workers (no `user`) keep root's
/// capabilities but get `no_new_privs` by default.
#[test]
fn workers_cannot_regain_privileges() {
    let w = World::new();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody")
        .uid
        .as_raw()
        .to_string();
    let sleep = vec!["/bin/sleep".to_string(), "3600".to_string()];
    let base = service(&w, "privs", sleep, 1).ready(supervisor_tests::ReadyMode::Exec);
    let mut sup = Supervisor::start(&w.net, base.clone().service_key("user", "nobody"));
    let full = proc_status(sup.pid().unwrap())["CapBnd"].clone();
    assert_ne!(
        full, NO_CAPS,
        "the supervisor itself keeps its bounding set"
    );

    let worker = |sup: &mut Supervisor<'_>, generation: u32| {
        let status = sup.wait_settled(generation, Duration::from_secs(30));
        let pids = worker_pids(&status, generation);
        assert_eq!(pids.len(), 1, "{status}");
        privileges(pids[0])
    };

    // user = "nobody", default no_new_privs = true.
    let [bnd, eff, prm, inh, amb, nnp, uid] = worker(&mut sup, 1);
    assert_eq!(uid, nobody);
    assert_eq!(
        [bnd.as_str(), &eff, &prm, &inh, &amb, &nnp],
        [NO_CAPS, NO_CAPS, NO_CAPS, NO_CAPS, NO_CAPS, "1"],
        "a worker running as nobody: CapBnd, CapEff, CapPrm, CapInh, CapAmb, NoNewPrivs"
    );

    // no_new_privs = false: setuid helpers work again.
    sup.set_config(
        base.clone()
            .service_key("user", "nobody")
            .service_key("no_new_privs", false),
    );
    sup.upgrade_ok();
    let [bnd, eff, _, _, _, nnp, uid] = worker(&mut sup, 2);
    assert_eq!(uid, nobody);
    assert_eq!([bnd.as_str(), &eff, &nnp], [full.as_str(), NO_CAPS, "0"]);

    // No user: root with root's capabilities, but no_new_privs by default.
    sup.set_config(base);
    sup.upgrade_ok();
    let [bnd, eff, _, _, _, nnp, uid] = worker(&mut sup, 3);
    assert_eq!(uid, "0");
    assert_eq!(
        [bnd.as_str(), &eff, &nnp],
        [full.as_str(), full.as_str(), "1"]
    );

    sup.stop();
    w.pins.assert_empty_after_stop();
}
