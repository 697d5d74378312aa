//! `Listeners::from_env` against real inherited fds, in a child process.
//!
//! Socket activation cannot be tested inside the test process: the fds must
//! be 3, 4, ... and `LISTEN_PID` must be the pid of the process that reads
//! it, known only after fork. So this test re-runs its own binary under
//! `sh`, which does what a supervisor does between fork and exec:
//!
//! * the sockets come in as stdin and stdout (the only fds `Command` passes),
//!   and `exec 3<&0 4>&1` moves them to 3 and 4 (dup2 clears close-on-exec);
//! * `export LISTEN_PID=$$` then `exec` keeps the pid: `$$` is the pid the
//!   test binary will have.
//!
//! No libtest harness (see Cargo.toml), so that the child's `main` is
//! single-threaded like a real worker's and may clean up the environment.

#![deny(unsafe_code)]

use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use worker_sdk::{Error, Listeners};

const MODE: &str = "WORKER_SDK_TEST_MODE";

fn main() {
    match std::env::var(MODE).ok().as_deref() {
        None => parent(),
        Some("adopt") => child_adopt(),
        Some("other-pid") => child_other_pid(),
        Some("missing-fd") => child_missing_fd(),
        Some(other) => panic!("unknown {MODE}={other}"),
    }
}

fn parent() {
    run("adopt", "2", "echo:other", None);
    run("other-pid", "2", "echo:other", Some("1"));
    run("missing-fd", "3", "echo:other:ghost", None);
    println!("socket_activation: 3 child scenarios passed");
}

/// Runs this binary as a socket-activated child with a UDP socket on fd 3
/// and a TCP listener on fd 4.
fn run(mode: &str, fds: &str, names: &str, listen_pid: Option<&str>) {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let pid = listen_pid.unwrap_or("$$");
    let script = format!(r#"exec 3<&0 4>&1 0</dev/null 1>&2; export LISTEN_PID={pid}; exec "$0""#);
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(std::env::current_exe().unwrap())
        .env(MODE, mode)
        .env("LISTEN_FDS", fds)
        .env("LISTEN_FDNAMES", names)
        .env("EXPECT_UDP_ADDR", udp_addr.to_string())
        .stdin(Stdio::from(OwnedFd::from(udp)))
        .stdout(Stdio::from(OwnedFd::from(tcp)))
        .status()
        .unwrap();
    assert!(status.success(), "child scenario {mode:?} failed: {status}");
}

fn cloexec(fd: impl AsFd) -> bool {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFD).unwrap();
    FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
}

fn child_adopt() {
    let mut listeners = Listeners::from_env().unwrap();
    assert!(listeners.is_activated());
    assert_eq!(listeners.len(), 2);
    assert_eq!(listeners.names(), ["echo", "other"]);
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert!(
            std::env::var_os(var).is_none(),
            "{var} is removed, as sd_listen_fds(1) does"
        );
    }

    let err = listeners.take_udp("other").unwrap_err().to_string();
    assert_eq!(
        err,
        r#"inherited fd 4 (LISTEN_FDNAMES entry "other") is not a UDP socket: it is a SOCK_STREAM socket"#
    );
    let echo = listeners.take_udp("echo").unwrap();
    assert_eq!(echo.len(), 1);
    assert_eq!(
        echo[0].local_addr().unwrap().to_string(),
        std::env::var("EXPECT_UDP_ADDR").unwrap()
    );
    assert!(
        cloexec(&echo[0]),
        "adopted fds must not leak into our children"
    );
    assert!(proc_cloexec(3));

    // The environment is clean, so a second look finds nothing for us.
    let again = Listeners::from_env().unwrap();
    assert!(!again.is_activated());
}

fn child_other_pid() {
    let listeners = Listeners::from_env().unwrap();
    assert!(!listeners.is_activated(), "LISTEN_PID=1 is not us");
    assert!(listeners.is_empty());
    // Not ours, so not touched: fd 3 is still open and inheritable, as it
    // arrived. (Looked up in /proc: borrowing an fd we do not own would take
    // `unsafe`, which is exactly what from_env must not have done here.)
    assert!(
        !proc_cloexec(3),
        "fds meant for another process are left alone"
    );
}

/// Whether `fd` has close-on-exec, from the `flags:` line (octal open flags)
/// of /proc/self/fdinfo/FD.
fn proc_cloexec(fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
    let flags = u32::from_str_radix(flags.trim(), 8).unwrap();
    flags & libc::O_CLOEXEC as u32 != 0
}

fn child_missing_fd() {
    match Listeners::from_env() {
        Err(err @ Error::BadFd { fd: 5, .. }) => {
            assert!(
                err.to_string().starts_with(
                    r#"inherited fd 5 (LISTEN_FDNAMES entry "ghost") is not usable: "#
                ),
                "{err}"
            );
        }
        other => panic!("expected BadFd for fd 5, got {other:?}"),
    }
}
