//! The supervisor's own sd_notify conversation, as a `Type=notify-reload` unit
//! with `WatchdogSec=` sees it: this test plays systemd's part by owning the
//! `NOTIFY_SOCKET` (this machine's PID 1 is not systemd).

#![deny(unsafe_code)]

use std::{
    os::unix::net::UnixDatagram,
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use supervisor_tests::{
    PinDir, ServiceConfig, TempDir, TestNet, bin_path, require_root, wait_timeout,
};

/// Collects notify messages until one satisfies `done`, or panics at the timeout.
fn until(
    socket: &UnixDatagram,
    seen: &mut Vec<String>,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(message.clone());
            if done(&message) {
                return message;
            }
        }
    }
    panic!("no {what} from the supervisor; messages so far: {seen:#?}");
}

#[test]
fn speaks_sd_notify_like_a_notify_reload_service() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("systemd");
    let config = ServiceConfig::echo(2, "127.0.0.1:5900".parse().unwrap(), &pins, run.path());
    let config_path = run.path().join("svc.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let notify_path = run.path().join("notify");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let mut cmd = net.exec(bin_path("supervisor"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = net.spawn(&mut cmd);
    let pid = Pid::from_raw(child.id() as i32);
    let mut seen = Vec::new();

    let ready = until(&socket, &mut seen, "READY=1", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(ready.contains("STATUS=generation 1 serving"), "{ready}");
    until(&socket, &mut seen, "a watchdog ping", |m| {
        m.lines().any(|l| l == "WATCHDOG=1")
    });

    // systemctl reload = SIGHUP for ReloadSignal=SIGHUP.
    kill(pid, Signal::SIGHUP).unwrap();
    let reloading = until(&socket, &mut seen, "RELOADING=1", |m| {
        m.lines().any(|l| l == "RELOADING=1")
    });
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading}"));
    assert!(usec.parse::<u64>().unwrap() > 0);
    let reloaded = until(&socket, &mut seen, "READY=1 after the reload", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(
        reloaded.contains("STATUS=generation 2 serving"),
        "{reloaded}"
    );

    kill(pid, Signal::SIGTERM).unwrap();
    until(&socket, &mut seen, "STOPPING=1", |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    let status =
        wait_timeout(&mut child, Duration::from_secs(20)).expect("supervisor exits after SIGTERM");
    assert!(status.success(), "{status}");

    // Workers must not inherit the supervisor's NOTIFY_SOCKET: every message here
    // is the supervisor's own (the echo workers' STATUS lines count datagrams).
    for message in &seen {
        for status in message.lines().filter_map(|l| l.strip_prefix("STATUS=")) {
            assert!(
                status.contains("generation")
                    || status.contains("draining")
                    || status.contains("upgrading"),
                "a worker's notify message reached the supervisor's NOTIFY_SOCKET: {message}"
            );
        }
    }
    pins.assert_empty_after_stop();
}
