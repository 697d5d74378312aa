//! `handoff = "bind"`: services that create and bind their own UDP sockets, and
//! know nothing of socket activation, run under the supervisor unchanged. Their
//! `bind()` to a listener's address is answered with the generation's socket
//! (seccomp user notification), so upgrades lose nothing; what else they bind
//! passes through; the options they set before `bind()` carry over; readiness
//! comes the way they already send it (`sd-notify` crate, `systemd-notify` from
//! a wrapper script). Also a real, unmodified DNS server from Debian (unbound)
//! under `dnsperf` through upgrades, and the bad input: a worker that never
//! binds a listener's address, seccomp user notification unavailable.

#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use supervisor_tests::supervisor::{generation_numbers, single_error_line, worker_pids};
use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ReadyMode, ServiceConfig, Supervisor, TempDir, TestNet,
    Trailer, World, bin_path, python3_path, require_root, self_binding_worker_path,
};

const ADDR: &str = "127.0.0.1:5300";
/// The steady load of the upgrade tests, datagrams per second in total.
const RATE: u64 = 5_000;
const SETTLE: Duration = Duration::from_secs(30);
const UPGRADES: u32 = 10;

fn addr() -> SocketAddr {
    ADDR.parse().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `python3 self_binding_worker.py ARGS...`.
fn python_worker(args: &[&str]) -> Vec<String> {
    let mut argv = vec![
        python3_path().to_string_lossy().into_owned(),
        self_binding_worker_path().to_string_lossy().into_owned(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

/// A one-listener service on `address` whose workers bind their own sockets.
fn bind_service(
    name: &str,
    command: Vec<String>,
    workers: u32,
    address: SocketAddr,
    pins: &PinDir,
    runtime: &Path,
) -> ServiceConfig {
    ServiceConfig::new(name, command, workers, address, pins, runtime)
        .service_key("handoff", "bind")
}

/// Sends `count` datagrams one at a time to `target` from inside `net` and
/// returns the trailers of the replies (each must come).
fn echo_round_trips(net: &TestNet, target: SocketAddr, count: u32) -> Vec<Trailer> {
    net.run_in(|| {
        let local = if target.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let socket = UdpSocket::bind(local).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut trailers = Vec::new();
        let mut buffer = [0u8; 256];
        for i in 0..count {
            let request = format!("request {i:08}");
            socket.send_to(request.as_bytes(), target).unwrap();
            let (len, _) = socket
                .recv_from(&mut buffer)
                .unwrap_or_else(|e| panic!("no reply to datagram {i} sent to {target}: {e}"));
            assert_eq!(&buffer[..request.len()], request.as_bytes());
            let trailer: [u8; 8] = buffer[request.len()..len]
                .try_into()
                .expect("8-byte trailer");
            trailers.push(Trailer::decode(&trailer));
        }
        trailers
    })
}

/// Runs `upgrades` upgrades in a row under a steady load of [`RATE`] datagrams
/// per second and checks that every datagram was answered exactly once, by
/// every generation in turn.
fn upgrades_under_load(sup: &mut Supervisor<'_>, net: &TestNet, upgrades: u32) {
    sup.wait_settled(1, SETTLE);
    let load = BackgroundLoad::start(
        net,
        LoadConfig::new(addr())
            .senders(2)
            .rate(RATE)
            .grace(Duration::from_secs(3)),
    );
    sup.wait_selected(1, 200, SETTLE);
    for i in 0..upgrades {
        let target = 2 + i;
        let out = sup.upgrade_ok();
        assert!(out.contains(&format!("generation {target}")), "{out}");
        assert_eq!(sup.serving_generation(), target);
        sup.wait_selected(target, 200, SETTLE);
    }
    let last = 1 + upgrades;
    sup.wait_selected(last, 1_000, SETTLE);
    let report = load.finish();
    println!("{upgrades} upgrades under load, workers binding their own sockets:\n{report}");
    report.assert_all_answered_once();
    assert_eq!(report.refused, 0, "{report}");
    let generations: BTreeSet<u32> = report.per_generation.keys().copied().collect();
    assert_eq!(
        generations,
        (1..=last).collect::<BTreeSet<u32>>(),
        "{report}"
    );
}

#[test]
fn python_worker_binding_its_own_socket_upgrades_under_load_lose_nothing() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let config = bind_service(
        "pybind",
        python_worker(&["--address", ADDR]),
        2,
        addr(),
        &pins,
        runtime.path(),
    );
    let mut sup = Supervisor::start(&net, config);
    // Not socket-activated: no LISTEN_FDS, no LISTEN_PID.
    let status = sup.wait_settled(1, SETTLE);
    for pid in worker_pids(&status, 1) {
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = text(&environ);
        assert!(!environ.contains("LISTEN_FDS="), "{environ}");
        assert!(!environ.contains("LISTEN_PID="), "{environ}");
    }
    upgrades_under_load(&mut sup, &net, UPGRADES);
    sup.stop();
    pins.assert_empty_after_stop();
}

/// A Rust service written the usual way: `UdpSocket::bind`, and `READY=1` with
/// the `sd-notify` crate (which needs `NOTIFY_SOCKET` to be a path).
#[test]
fn rust_worker_with_the_sd_notify_crate_upgrades_under_load_lose_nothing() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let command = vec![
        bin_path("self-binding-worker")
            .to_string_lossy()
            .into_owned(),
        "--bind".into(),
        ADDR.into(),
    ];
    let config =
        bind_service("rsbind", command, 2, addr(), &pins, runtime.path()).ready(ReadyMode::Notify);
    let mut sup = Supervisor::start(&net, config);
    upgrades_under_load(&mut sup, &net, UPGRADES);
    sup.stop();
    pins.assert_empty_after_stop();
}

/// The same, as a static binary (built here with `rustc -C
/// target-feature=+crt-static`): no dynamic loader, nothing an `LD_PRELOAD` shim
/// could hook; the kernel-side interception works all the same.
#[test]
fn static_rust_binary_upgrades_under_load_lose_nothing() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let build = TempDir::new("static-worker");
    let binary = build.path().join("self_binding_static");
    let source =
        supervisor_tests::workspace_root().join("examples/static-worker/self_binding_static.rs");
    let out = std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args([
            "--edition",
            "2024",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("rustc");
    assert!(
        out.status.success(),
        "building the static worker: {}",
        text(&out.stderr)
    );
    assert!(
        !has_interpreter(&fs::read(&binary).unwrap()),
        "the worker is not static: it has a PT_INTERP (a dynamic loader)"
    );
    let command = vec![binary.to_string_lossy().into_owned(), ADDR.into()];
    let config =
        bind_service("stbind", command, 2, addr(), &pins, runtime.path()).ready(ReadyMode::Notify);
    let mut sup = Supervisor::start(&net, config);
    upgrades_under_load(&mut sup, &net, UPGRADES);
    sup.stop();
    pins.assert_empty_after_stop();
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// Reads the worker's report (`--report DIR`) once it has `key`.
fn wait_report(dir: &Path, key: &str) -> serde_json::Value {
    let deadline = Instant::now() + SETTLE;
    loop {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(text) = fs::read_to_string(&path)
                && let Ok(report) = serde_json::from_str::<serde_json::Value>(&text)
                && report.get(key).is_some()
            {
                return report;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no worker report with {key:?} in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `IP_PKTINFO` and `SO_RCVBUF` set before `bind()` are in effect on the socket
/// the worker is given: it reads each datagram's destination address from
/// `IP_PKTINFO`, and its receive buffer is what it asked for (16 MiB, more than
/// the listener's 4 MiB).
#[test]
fn options_set_before_bind_carry_over() {
    require_root();
    let w = World::new();
    let reports = TempDir::new("sup-report");
    const RCVBUF: u64 = 16 << 20;
    let rcvbuf = RCVBUF.to_string();
    let config = bind_service(
        "opts",
        python_worker(&[
            "--address",
            ADDR,
            "--pktinfo",
            "--rcvbuf",
            &rcvbuf,
            "--report",
            reports.path().to_str().unwrap(),
        ]),
        1,
        addr(),
        &w.pins,
        w.runtime.path(),
    );
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, SETTLE);
    let trailers = echo_round_trips(&w.net, addr(), 20);
    assert!(trailers.iter().all(|t| t.generation == 1), "{trailers:?}");
    let report = wait_report(reports.path(), "pktinfo_seen");
    let socket = &report["sockets"][0];
    assert_eq!(socket["pktinfo"], 1, "{report}");
    // The kernel reports twice the size asked for.
    assert!(
        socket["rcvbuf"].as_u64().unwrap() >= 2 * RCVBUF,
        "SO_RCVBUF did not carry over: {report}"
    );
    assert_eq!(report["pktinfo_seen"], true, "{report}");
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// A service binding UDP and TCP on the same port: the UDP bind is intercepted
/// (answered by the generation's socket), the TCP one passes through (the
/// worker's own listening socket answers a connection).
#[test]
fn udp_is_intercepted_and_tcp_on_the_same_port_passes_through() {
    require_root();
    let w = World::new();
    let config = bind_service(
        "udptcp",
        python_worker(&["--address", ADDR, "--tcp"]),
        2,
        addr(),
        &w.pins,
        w.runtime.path(),
    );
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, SETTLE);
    let trailers = echo_round_trips(&w.net, addr(), 50);
    let workers: BTreeSet<u16> = trailers.iter().map(|t| t.worker).collect();
    assert_eq!(workers, BTreeSet::from([0, 1]), "{trailers:?}");
    for _ in 0..2 {
        let answer = w.net.run_in(|| {
            let mut stream = TcpStream::connect_timeout(&addr(), Duration::from_secs(5))
                .expect("TCP connect to the worker's own listener");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        });
        assert_eq!(answer, "tcp ok\n");
    }
    // Still both after an upgrade (the TCP listeners of two generations share the
    // port with SO_REUSEPORT, the service's own business).
    sup.upgrade_ok();
    let trailers = echo_round_trips(&w.net, addr(), 20);
    assert!(trailers.iter().all(|t| t.generation == 2), "{trailers:?}");
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// One worker binding the same address from four threads gets its four sockets
/// (`sockets_per_worker = 4`), and every one of them serves.
#[test]
fn four_threads_binding_one_address_get_the_four_sockets() {
    require_root();
    let w = World::new();
    let config = bind_service(
        "threads",
        python_worker(&["--address", ADDR, "--threads", "4"]),
        1,
        addr(),
        &w.pins,
        w.runtime.path(),
    )
    .sockets_per_worker(4);
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, SETTLE);
    let report = supervisor_tests::loadgen::run_in(
        &w.net.netns_path(),
        &LoadConfig::new(addr()).senders(8).count(4_000).rate(4_000),
    )
    .unwrap();
    report.assert_all_answered_once();
    let sockets: BTreeSet<u16> = report.per_socket.keys().map(|t| t.socket).collect();
    assert_eq!(sockets, BTreeSet::from([0, 1, 2, 3]), "{report}");
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// A worker killed while serving is exec'd again, binds again and is given the
/// same socket: what was sent while it was down is answered by the new process.
#[test]
fn a_restarted_worker_binds_again_and_serves_what_was_queued() {
    require_root();
    let w = World::new();
    let config = bind_service(
        "restart",
        python_worker(&["--address", ADDR]),
        1,
        addr(),
        &w.pins,
        w.runtime.path(),
    );
    let mut sup = Supervisor::start(&w.net, config);
    let status = sup.wait_settled(1, SETTLE);
    let first = worker_pids(&status, 1)[0];
    echo_round_trips(&w.net, addr(), 10);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Until it is gone, the dying worker may still take the first datagram off its
    // socket (and lose it with itself): queue only once nothing reads.
    supervisor_tests::crash::wait_dead(first);
    const QUEUED: u32 = 50;
    let answered = w.net.run_in(|| {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..QUEUED {
            socket
                .send_to(format!("queued {i:04}").as_bytes(), addr())
                .unwrap();
        }
        socket
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut buffer = [0u8; 64];
        let mut answered = BTreeSet::new();
        while answered.len() < QUEUED as usize {
            let Ok((len, _)) = socket.recv_from(&mut buffer) else {
                break;
            };
            answered.insert(text(&buffer[..len - 8]));
        }
        answered
    });
    assert_eq!(answered.len(), QUEUED as usize, "{answered:?}");
    let status = sup.status_json();
    let second = worker_pids(&status, 1)[0];
    assert_ne!(second, first, "{status}");
    let trailers = echo_round_trips(&w.net, addr(), 10);
    assert!(trailers.iter().all(|t| t.generation == 1), "{trailers:?}");
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// A fifth bind past `sockets_per_worker` gets `EADDRINUSE`.
#[test]
fn binding_more_sockets_than_sockets_per_worker_is_address_in_use() {
    require_root();
    let w = World::new();
    let mut config = bind_service(
        "toomany",
        python_worker(&["--address", ADDR, "--threads", "5"]),
        1,
        addr(),
        &w.pins,
        w.runtime.path(),
    )
    .sockets_per_worker(4);
    config.ready_timeout = Some(Duration::from_secs(10));
    let mut sup = Supervisor::spawn(&w.net, config);
    let status = sup.wait_exit(SETTLE);
    assert!(!status.success());
    let (_, stderr) = sup.logs();
    assert!(stderr.contains("Address already in use"), "{stderr}");
    w.assert_nothing_left("toomany");
}

/// An IPv6 listener answers a worker that binds the IPv6 wildcard; an IPv4
/// wildcard listener answers a worker that binds 127.0.0.1.
#[test]
fn ipv6_and_wildcard_listeners() {
    require_root();
    for (listener, bound, target) in [
        ("[::1]:5300", "[::]:5300", "[::1]:5300"),
        ("0.0.0.0:5300", "127.0.0.1:5300", "127.0.0.1:5300"),
    ] {
        let w = World::new();
        let config = bind_service(
            "families",
            python_worker(&["--address", bound]),
            1,
            listener.parse().unwrap(),
            &w.pins,
            w.runtime.path(),
        );
        let mut sup = Supervisor::start(&w.net, config);
        sup.wait_settled(1, SETTLE);
        let trailers = echo_round_trips(&w.net, target.parse().unwrap(), 20);
        assert!(trailers.iter().all(|t| t.generation == 1), "{trailers:?}");
        sup.upgrade_ok();
        let trailers = echo_round_trips(&w.net, target.parse().unwrap(), 20);
        assert!(
            trailers.iter().all(|t| t.generation == 2),
            "listener {listener}, bound {bound}: {trailers:?}"
        );
        sup.stop();
        w.pins.assert_empty_after_stop();
    }
}

/// A wrapper script whose `systemd-notify --ready` (a child of the worker, with
/// its own pid) makes the worker ready; the service itself says nothing.
#[test]
fn systemd_notify_from_a_wrapper_script_makes_the_worker_ready() {
    require_root();
    let w = World::new();
    let worker = python_worker(&["--address", ADDR]).join(" ");
    let script = format!("systemd-notify --ready & exec env -u NOTIFY_SOCKET {worker}");
    let config = bind_service(
        "wrapped",
        vec!["/bin/sh".into(), "-c".into(), script],
        1,
        addr(),
        &w.pins,
        w.runtime.path(),
    )
    .ready(ReadyMode::Notify);
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, SETTLE);
    echo_round_trips(&w.net, addr(), 10);
    sup.upgrade_ok();
    let trailers = echo_round_trips(&w.net, addr(), 10);
    assert!(trailers.iter().all(|t| t.generation == 2), "{trailers:?}");
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// A service that binds a privileged port as root and then drops to `nobody`,
/// binds in a forked child (which also says `READY=1`), and closes its first
/// socket and binds again: it is given the listener's socket all the same.
#[test]
fn binding_in_a_child_after_a_close_then_dropping_privileges() {
    require_root();
    let w = World::new();
    const PRIVILEGED: &str = "127.0.0.1:53";
    let config = bind_service(
        "forked",
        python_worker(&[
            "--address",
            PRIVILEGED,
            "--bind-in-child",
            "--rebind",
            "--user",
            "nobody",
        ]),
        1,
        PRIVILEGED.parse().unwrap(),
        &w.pins,
        w.runtime.path(),
    )
    .ready(ReadyMode::Notify);
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, SETTLE);
    let trailers = echo_round_trips(&w.net, PRIVILEGED.parse().unwrap(), 20);
    assert!(trailers.iter().all(|t| t.generation == 1), "{trailers:?}");
    // The child that serves runs as nobody.
    let status = sup.status_json();
    let worker = worker_pids(&status, 1)[0];
    let children = fs::read_to_string(format!("/proc/{worker}/task/{worker}/children")).unwrap();
    let child: i32 = children
        .split_whitespace()
        .next()
        .expect("a child")
        .parse()
        .unwrap();
    let uid = fs::read_to_string(format!("/proc/{child}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next().unwrap().to_string())
        })
        .unwrap();
    assert_eq!(uid, "65534", "the serving child dropped to nobody");
    sup.upgrade_ok();
    let trailers = echo_round_trips(&w.net, PRIVILEGED.parse().unwrap(), 20);
    assert!(trailers.iter().all(|t| t.generation == 2), "{trailers:?}");
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// `READY=1` from a process that is neither a worker nor one of its descendants
/// (this test, sending to the notify socket's path) does not count.
#[test]
fn ready_from_a_stranger_does_not_count() {
    require_root();
    let w = World::new();
    let mut config = bind_service(
        "stranger",
        vec!["/usr/bin/env".into(), "-u".into(), "NOTIFY_SOCKET".into()]
            .into_iter()
            .chain(python_worker(&["--address", ADDR]))
            .collect(),
        1,
        addr(),
        &w.pins,
        w.runtime.path(),
    )
    .ready(ReadyMode::Notify);
    config.ready_timeout = Some(Duration::from_secs(3));
    let notify_path = w.runtime.path().join("stranger.notify");
    let mut sup = Supervisor::spawn(&w.net, config);
    let stranger = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let deadline = Instant::now() + SETTLE;
    let status = loop {
        let _ = stranger.send_to(b"READY=1", &notify_path);
        if let Some(status) = sup.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor neither failed nor served"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let (_, stderr) = sup.logs();
    assert!(
        stderr.contains("not ready within ready_timeout"),
        "{stderr}"
    );
    w.assert_nothing_left("stranger");
}

/// A new generation whose worker never binds the listener's address (it binds
/// another port) fails the upgrade with an error that names the listener; the
/// old generation serves on, untouched.
#[test]
fn a_worker_that_never_binds_the_listener_fails_the_upgrade_and_keeps_the_old_one() {
    require_root();
    let w = World::new();
    let good = bind_service(
        "nobind",
        python_worker(&["--address", ADDR]),
        1,
        addr(),
        &w.pins,
        w.runtime.path(),
    );
    let mut sup = Supervisor::start(&w.net, good.clone());
    let status = sup.wait_settled(1, SETTLE);
    let pids = worker_pids(&status, 1);
    let mut elsewhere = good.clone();
    elsewhere.command = python_worker(&["--address", "127.0.0.1:5999"]);
    elsewhere.ready_timeout = Some(Duration::from_secs(3));
    sup.set_config(elsewhere);
    let out = sup.upgrade();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = single_error_line(&stderr);
    assert!(
        line.contains("never bound listener \"nobind\"'s address 127.0.0.1:5300")
            && line.contains("ready_timeout"),
        "{line}"
    );
    let status = sup.status_json();
    assert_eq!(generation_numbers(&status), vec![1], "{status}");
    assert_eq!(worker_pids(&status, 1), pids);
    let trailers = echo_round_trips(&w.net, addr(), 20);
    assert!(trailers.iter().all(|t| t.generation == 1), "{trailers:?}");
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// Where the supervisor cannot give its workers a seccomp user-notification
/// filter (here: it runs under a seccomp filter of its own that fails every
/// `seccomp()` call with ENOSYS, as a container runtime's may), `handoff =
/// "bind"` is bad input: `check` and `run` exit 2 with one line that says so,
/// and nothing is left.
#[test]
fn bind_handoff_without_seccomp_user_notification_is_refused() {
    let w = World::new();
    let config = bind_service(
        "noseccomp",
        python_worker(&["--address", ADDR]),
        1,
        addr(),
        &w.pins,
        w.runtime.path(),
    );
    let path = w.write_text("noseccomp.toml", &config.to_toml());
    let deny = w.write_text("deny_seccomp.py", DENY_SECCOMP);
    let python = python3_path();
    let wrapper = [python.to_str().unwrap(), deny.to_str().unwrap()];
    for command in ["check", "run"] {
        let out = w.supervisor(&wrapper, &[command], &path);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        let line = single_error_line(&stderr);
        assert!(
            line.contains("service.handoff = \"bind\"")
                && line.contains("seccomp user notification is not available"),
            "{command}: {line}"
        );
    }
    w.assert_nothing_left("noseccomp");
}

/// Execs its arguments under a seccomp filter that fails `seccomp()` (and
/// `prctl(PR_SET_SECCOMP)`) with ENOSYS and allows everything else.
const DENY_SECCOMP: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
AUDIT_ARCH_X86_64, SYS_seccomp, ENOSYS = 0xC000003E, 317, 38
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
def insn(code, jt, jf, k): return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    insn(0x20, 0, 0, 4),                      # load arch
    insn(0x15, 0, 3, AUDIT_ARCH_X86_64),      # other arch: allow
    insn(0x20, 0, 0, 0),                      # load nr
    insn(0x15, 0, 1, SYS_seccomp),
    insn(0x06, 0, 0, RET_ERRNO | ENOSYS),
    insn(0x06, 0, 0, RET_ALLOW),
])
buf = ctypes.create_string_buffer(prog)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_NO_NEW_PRIVS failed")
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
    sys.exit("PR_SET_SECCOMP failed: errno %d" % ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"#;

/// A real, unmodified DNS server from Debian's packages, binding its own UDP
/// socket (no socket activation), under `dnsperf` at 5 000 queries/s through
/// four upgrades: every query is answered.
#[test]
fn unbound_through_upgrades_under_dnsperf_loses_nothing() {
    require_root();
    let w = World::new();
    let unbound = which("unbound");
    let dnsperf = which("dnsperf");
    let conf = w.write_text(
        "unbound.conf",
        &format!(
            r#"server:
    interface: 127.0.0.1@5300
    port: 5300
    do-tcp: no
    do-ip6: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    local-zone: "example.test." static
    local-data: "a.example.test. 300 IN A 192.0.2.1"
remote-control:
    control-enable: no
"#,
            dir = w.work.path().display()
        ),
    );
    let queries = w.write_text("queries", "a.example.test A\n");
    let config = bind_service(
        "unbound",
        vec![
            unbound.clone(),
            "-d".into(),
            "-c".into(),
            conf.to_string_lossy().into_owned(),
        ],
        2,
        addr(),
        &w.pins,
        w.runtime.path(),
    )
    .ready(ReadyMode::Exec);
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, SETTLE);
    const SECONDS: u64 = 20;
    let perf = w
        .net
        .exec(&dnsperf)
        .args([
            "-s",
            "127.0.0.1",
            "-p",
            "5300",
            "-c",
            "4",
            "-t",
            "5",
            "-Q",
            "5000",
        ])
        .args(["-l", &SECONDS.to_string(), "-d", queries.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dnsperf");
    std::thread::sleep(Duration::from_secs(2));
    for target in 2..=5 {
        sup.upgrade_ok();
        assert_eq!(sup.serving_generation(), target);
        std::thread::sleep(Duration::from_secs(2));
    }
    let out = perf.wait_with_output().unwrap();
    let report = text(&out.stdout);
    println!("unbound, 4 upgrades under dnsperf:\n{report}");
    assert!(out.status.success(), "{report}{}", text(&out.stderr));
    let sent = dnsperf_count(&report, "Queries sent:");
    let completed = dnsperf_count(&report, "Queries completed:");
    let lost = dnsperf_count(&report, "Queries lost:");
    assert!(sent > 10_000, "{report}");
    assert_eq!(lost, 0, "{report}");
    assert_eq!(completed, sent, "{report}");
    assert!(report.contains(&format!("NOERROR {sent} ")), "{report}");
    sup.stop();
    w.pins.assert_empty_after_stop();
}

fn which(program: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let path = Path::new(dir).join(program);
        if path.is_file() {
            return path.to_string_lossy().into_owned();
        }
    }
    panic!("{program} is not installed: run scripts/bootstrap.sh");
}

/// The number after `label` in dnsperf's report.
fn dnsperf_count(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in dnsperf's report:\n{report}"))
}
