//! The control socket under pressure (issue 12, item 7): connections that never
//! send a request, a request without end, and a daemon out of fds. The daemon
//! must stay bounded (fds, memory, log) and keep answering `status`.
//!
//! Bounds are on fd counts, memory and log bytes, with wide margins, never on time.

use std::time::{Duration, Instant};

use supervisor_tests::World;
use supervisor_tests::pressure::{ControlConnection, open_fds, reset_peak_rss, status_kib};
use supervisor_tests::{ServiceConfig, Supervisor};

/// Connections the daemon serves at once (docs/control-protocol.md).
const CONNECTION_CAP: usize = 64;
/// The longest request line the daemon reads (docs/control-protocol.md).
const MAX_REQUEST: usize = 64 * 1024;

/// The echo service with one worker, in `w`'s world.
fn one_worker(w: &World) -> ServiceConfig {
    ServiceConfig::echo(1, World::addr(), &w.pins, w.runtime.path())
}

/// Polls `status` until it answers, for at most `bound`; panics otherwise.
fn status_answers_within(sup: &Supervisor<'_>, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        match sup.try_status_json() {
            Ok(_) => return,
            Err(e) if Instant::now() >= deadline => {
                panic!("status did not answer within {bound:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Connections that never send their request do not pile up: the daemon holds
/// at most [`CONNECTION_CAP`] of them, closes each after its idle timeout with
/// an error event, and `status` still answers while they are open.
#[test]
fn idle_connections_are_capped_and_closed() {
    let w = World::new();
    let config = one_worker(&w);
    let socket = config.control_socket();
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, Duration::from_secs(30));
    let pid = sup.pid().unwrap();
    let fds_before = open_fds(pid).len();

    let mut idle: Vec<ControlConnection> =
        (0..200).map(|_| ControlConnection::open(&socket)).collect();
    // The CLI still gets its answer while 200 connections sit idle, at the first
    // try: it takes the place of the oldest idle one.
    sup.status_json();
    let fds_during = open_fds(pid).len();
    println!("daemon fds: {fds_before} before, {fds_during} with 200 idle connections");
    assert!(
        fds_during <= fds_before + CONNECTION_CAP + 8,
        "200 idle connections hold {} fds of the daemon (cap {CONNECTION_CAP})",
        fds_during - fds_before
    );

    // The oldest idle connection is told why it is closed (made room for a newer
    // one, or its idle timeout).
    let events = idle[0].events(Duration::from_secs(60));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "error", "{events:?}");
    assert_eq!(events[0]["exit_code"], 2, "{events:?}");
    // The newest ones too, by the idle timeout at the latest.
    let last = idle.last_mut().unwrap().events(Duration::from_secs(60));
    assert_eq!(last.len(), 1, "{last:?}");
    let message = last[0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no request"), "{last:?}");
    drop(idle);
    status_answers_within(&sup, Duration::from_secs(30));
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// A 100 MB request without a newline gets one clear error and does not grow
/// the daemon.
#[test]
fn oversized_request_is_refused_without_growing_the_daemon() {
    let w = World::new();
    let config = one_worker(&w);
    let socket = config.control_socket();
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, Duration::from_secs(30));
    let pid = sup.pid().unwrap();
    reset_peak_rss(pid);
    let before = status_kib(pid, "VmRSS");

    let mut conn = ControlConnection::open(&socket);
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    for _ in 0..100 {
        if conn.write(&chunk).is_err() {
            break; // the daemon stopped reading and closed
        }
        sent += chunk.len();
    }
    // Whatever was read: no newline will ever come.
    let _ = conn.stream().shutdown(std::net::Shutdown::Write);
    let events = conn.events(Duration::from_secs(30));
    let peak = status_kib(pid, "VmHWM");
    println!(
        "sent {sent} bytes before the daemon closed; RSS {before} KiB, peak {peak} KiB; events {events:?}"
    );
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "error");
    assert_eq!(events[0]["exit_code"], 2);
    let message = events[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&MAX_REQUEST.to_string()),
        "the error should name the limit: {message}"
    );
    assert!(
        sent < 100 << 20,
        "the daemon read all 100 MB of a request it cannot use"
    );
    assert!(
        peak < before + 32 * 1024,
        "a 100 MB request grew the daemon from {before} KiB to {peak} KiB"
    );
    status_answers_within(&sup, Duration::from_secs(30));
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// At its fd limit the daemon cannot accept; it must not spin on the listening
/// socket logging a warning per attempt (726 MB in 25 s), and it answers again
/// once fds are free.
#[test]
fn fd_limit_does_not_flood_the_log() {
    let w = World::new();
    let config = one_worker(&w);
    let socket = config.control_socket();
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, Duration::from_secs(30));
    let pid = sup.pid().unwrap();

    // A few fds above what it has open now.
    let limit = open_fds(pid).len() as u64 + 4;
    let old = set_nofile(pid, limit);
    let conns: Vec<ControlConnection> = (0..32).map(|_| ControlConnection::open(&socket)).collect();
    let log_before = sup.logs().1.len();
    // Long enough for a spinning accept loop to write megabytes.
    std::thread::sleep(Duration::from_secs(3));
    let log_growth = sup.logs().1.len() - log_before;
    println!("log grew by {log_growth} bytes in 3 s at the fd limit ({limit})");
    assert!(
        log_growth < 64 * 1024,
        "the daemon wrote {log_growth} bytes of log in 3 s at its fd limit"
    );
    drop(conns);
    restore_nofile(pid, old);
    status_answers_within(&sup, Duration::from_secs(30));
    sup.stop();
    w.pins.assert_empty_after_stop();
}

/// Sets `pid`'s soft RLIMIT_NOFILE to `limit`; returns the old limits.
fn set_nofile(pid: u32, limit: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit writes the current limits to `old`, valid for the call.
    let ret = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(ret, 0, "prlimit: {}", std::io::Error::last_os_error());
    restore_nofile(
        pid,
        libc::rlimit {
            rlim_cur: limit,
            rlim_max: old.rlim_max,
        },
    );
    old
}

fn restore_nofile(pid: u32, limits: libc::rlimit) {
    // SAFETY: prlimit reads `limits`, valid for the call.
    let ret = unsafe {
        libc::prlimit(
            pid as i32,
            libc::RLIMIT_NOFILE,
            &limits,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(ret, 0, "prlimit: {}", std::io::Error::last_os_error());
}
