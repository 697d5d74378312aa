//! The example workers as a supervisor runs them, without the supervisor (and
//! without root): sockets passed by socket activation, `READY=1` on a notify
//! socket, the echo trailer, and what each does on SIGTERM.
//!
//! The launch does what a supervisor does between fork and exec, with `sh`:
//! the sockets come in as stdin and stdout (the only fds `Command` passes on),
//! `exec 3<&0 4>&1` moves them to fds 3 and 4 (dup2 clears close-on-exec),
//! and `export LISTEN_PID=$$; exec worker` gives the worker the pid `$$`.

#![deny(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use supervisor_examples::echo::{Trailer, sequence, split_reply};

const ECHO_WORKER: &str = env!("CARGO_BIN_EXE_echo-worker");

/// A worker started with two inherited sockets named "echo", as generation
/// `generation`, worker `worker`, with its notify socket.
struct Activated {
    child: Child,
    sockets: [SocketAddr; 2],
    notify: UnixDatagram,
}

fn launch(program: &[&str], generation: u32, worker: u32) -> Activated {
    let first = UdpSocket::bind("127.0.0.1:0").unwrap();
    let second = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sockets = [first.local_addr().unwrap(), second.local_addr().unwrap()];

    let name = format!(
        "supervisor-examples-test/{}/{generation}",
        std::process::id()
    );
    let notify = UnixDatagram::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap(),
    )
    .unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3<&0 4>&1 0</dev/null 1>&2; export LISTEN_PID=$$; exec "$@""#)
        .arg("sh")
        .args(program)
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "echo:echo")
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .env("SUPERVISOR_GENERATION", generation.to_string())
        .env("SUPERVISOR_WORKER", worker.to_string())
        .stdin(Stdio::from(OwnedFd::from(first)))
        .stdout(Stdio::from(OwnedFd::from(second)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Activated {
        child,
        sockets,
        notify,
    }
}

impl Activated {
    fn next_notification(&self) -> String {
        let mut buf = [0u8; 512];
        let n = self
            .notify
            .recv(&mut buf)
            .expect("a notify message from the worker");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

fn client() -> UdpSocket {
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client
}

/// Sends sequence number `seq` with some payload and returns the echoed
/// request and the trailer.
fn round_trip(client: &UdpSocket, to: SocketAddr, seq: u64) -> (Vec<u8>, Trailer) {
    let mut request = seq.to_le_bytes().to_vec();
    request.extend_from_slice(b"payload");
    client.send_to(&request, to).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, to, "the reply comes from the socket we sent to");
    let (echoed, trailer) = split_reply(&buf[..n]).expect("a trailer");
    assert_eq!(echoed, request, "the request comes back verbatim");
    (echoed.to_vec(), trailer)
}

#[test]
fn echo_worker_serves_inherited_sockets_and_drains_what_is_queued() {
    let worker = launch(&[ECHO_WORKER], 7, 1);
    assert_eq!(worker.next_notification(), "READY=1");

    let client = client();
    for (index, &addr) in worker.sockets.iter().enumerate() {
        let (_, trailer) = round_trip(&client, addr, index as u64);
        assert_eq!(
            trailer,
            Trailer {
                generation: 7,
                worker: 1,
                socket: index as u16
            }
        );
    }

    // Freeze the worker, queue datagrams in its socket, then ask it to
    // drain: what the kernel queued before the drain signal must be served.
    worker.signal(Signal::SIGSTOP);
    const QUEUED: u64 = 100;
    for seq in 0..QUEUED {
        client
            .send_to(&seq.to_le_bytes(), worker.sockets[0])
            .unwrap();
    }
    worker.signal(Signal::SIGTERM);
    worker.signal(Signal::SIGCONT);

    let mut answered = vec![false; QUEUED as usize];
    let mut buf = [0u8; 64];
    for _ in 0..QUEUED {
        let n = client
            .recv(&mut buf)
            .expect("every queued datagram is answered");
        answered[sequence(&buf[..n]).unwrap() as usize] = true;
    }
    assert!(answered.iter().all(|&a| a));

    let output = worker.child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit 0 after draining: {}; stderr: {stderr}",
        output.status
    );
    assert_eq!(
        stderr.trim(),
        format!(
            "echo-worker gen=7 worker=1 drained: served {} datagrams",
            QUEUED + 2
        )
    );
}

#[test]
fn echo_worker_notifies_stopping_when_draining() {
    let mut worker = launch(&[ECHO_WORKER, "--read-deadline-ms", "50"], 3, 0);
    assert_eq!(worker.next_notification(), "READY=1");
    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.next_notification(), "STOPPING=1");
    assert!(
        worker
            .next_notification()
            .starts_with("STATUS=draining 2 sockets")
    );
    let status = worker.child.wait().unwrap();
    assert!(status.success());
}

#[test]
fn echo_worker_honours_drain_signal_flag() {
    let mut worker = launch(&[ECHO_WORKER, "--drain-signal", "SIGUSR2"], 1, 0);
    assert_eq!(worker.next_notification(), "READY=1");
    worker.signal(Signal::SIGUSR2);
    let status = worker.child.wait().unwrap();
    assert!(status.success(), "SIGUSR2 drains and exits 0: {status}");
}

#[test]
fn echo_worker_binds_its_own_socket_when_run_by_hand() {
    // A port that was free a moment ago; the worker binds it with
    // SO_REUSEPORT, so even a late reuse by another test would not fail it.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(ECHO_WORKER)
        .args(["--bind", &addr.to_string(), "--read-deadline-ms", "50"])
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("SUPERVISOR_GENERATION")
        .env_remove("SUPERVISOR_WORKER")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // No READY to wait for: retry until the socket is bound.
    let client = client();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    let reply = (0..50).find_map(|_| {
        client.send_to(&42u64.to_le_bytes(), addr).unwrap();
        client.recv(&mut buf).ok()
    });
    let n = reply.expect("the worker answers on --bind");
    let (echoed, trailer) = split_reply(&buf[..n]).unwrap();
    assert_eq!(sequence(echoed), Some(42));
    assert_eq!(
        trailer,
        Trailer::default(),
        "generation and worker are 0 when not set"
    );

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("echo-worker gen=0 worker=0 drained: served "),
        "{stderr}"
    );
}

#[test]
fn python_worker_speaks_socket_activation_and_dies_on_sigterm() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 not found; skipping");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python-worker/echo_worker.py");
    let mut worker = launch(&["python3", script.to_str().unwrap()], 9, 4);
    assert_eq!(worker.next_notification(), "READY=1");

    let client = client();
    for (index, &addr) in worker.sockets.iter().enumerate() {
        let (_, trailer) = round_trip(&client, addr, 100 + index as u64);
        assert_eq!(
            trailer,
            Trailer {
                generation: 9,
                worker: 4,
                socket: index as u16
            }
        );
    }

    worker.signal(Signal::SIGTERM);
    let status = worker.child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "SIGTERM keeps its default action"
    );
}
