//! The baselines a user would run without the supervisor: `echo-worker --bind ADDR`
//! started by hand (it binds its own socket with `SO_REUSEPORT`), no eBPF program.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use nix::unistd::Pid;

use crate::{TestNet, bin_path, wait_timeout};

/// A `NOTIFY_SOCKET` of our own, so a worker started by hand can say `READY=1` (after it
/// has bound its socket and started serving) exactly as it would to the supervisor.
pub struct NotifyListener {
    sock: UnixDatagram,
    name: String,
}

impl NotifyListener {
    /// Binds an abstract unix socket inside `net`: abstract names are per network
    /// namespace, and the workers run there.
    pub fn new(net: &TestNet) -> NotifyListener {
        let name = format!("supervisor-bench/{}/notify", crate::unique_suffix());
        let sock = net.run_in(|| {
            let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
            UnixDatagram::bind_addr(&addr).expect("bind the notify socket")
        });
        // Credentials on every message, so a READY=1 is attributed to the right pid.
        setsockopt(&sock, sockopt::PassCred, &true).expect("SO_PASSCRED");
        NotifyListener { sock, name }
    }

    /// The `NOTIFY_SOCKET` value.
    pub fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    /// Waits until every one of `pids` has sent `READY=1`; `Err` at the timeout,
    /// naming those that did not.
    pub fn wait_ready(&self, pids: &[u32], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut waiting: Vec<u32> = pids.to_vec();
        let mut buf = [0u8; 4096];
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "pids {waiting:?} sent no READY=1 within {timeout:?}"
                ));
            }
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("receive on the notify socket: {e}")),
            };
            let sender = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::ScmCredentials(c) => Some(c.pid()),
                    _ => None,
                })
            });
            let len = msg.bytes;
            if String::from_utf8_lossy(&buf[..len])
                .lines()
                .any(|l| l == "READY=1")
            {
                waiting.retain(|&p| Some(p as i32) != sender);
            }
        }
        Ok(())
    }
}

/// One `echo-worker --bind ADDR` started by hand in a namespace; SIGKILLed on drop.
pub struct HandWorker {
    child: Option<Child>,
}

impl HandWorker {
    /// Starts the worker. It exits at once on SIGTERM, like most services: its graceful
    /// drain is moved to SIGUSR2 (never sent), because a drain that waits for an idle
    /// socket never ends in a plain reuseport group under steady load (the kernel keeps
    /// hashing new datagrams to it).
    pub fn spawn(net: &TestNet, addr: SocketAddr, notify: &NotifyListener) -> HandWorker {
        let mut cmd = net.exec(bin_path("echo-worker"));
        cmd.arg("--bind")
            .arg(addr.to_string())
            .args(["--drain-signal", "SIGUSR2"])
            .env("NOTIFY_SOCKET", notify.env_value())
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("SUPERVISOR_DRAIN_SIGNAL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        HandWorker {
            child: Some(net.spawn(&mut cmd)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends SIGTERM and returns at once.
    pub fn term(&self) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
    }

    /// Waits for the exit, SIGKILLing it after `timeout`; true when it went by itself.
    pub fn reap(mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if wait_timeout(&mut child, timeout).is_some() {
            return true;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

/// SIGTERM to all first, then waits for each, as `kill PIDS; wait` would: stopping
/// them one after the other would lengthen a stop-then-start gap for no reason.
/// Returns how many had to be SIGKILLed after `timeout`.
pub fn terminate_all(workers: Vec<HandWorker>, timeout: Duration) -> usize {
    for w in &workers {
        w.term();
    }
    workers
        .into_iter()
        .map(|w| w.reap(timeout))
        .filter(|&went| !went)
        .count()
}

impl Drop for HandWorker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
