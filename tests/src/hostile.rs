//! What a careless operator or another local user does to a supervisor, for the
//! hardening tests: a socket in someone else's reuseport group, a fake daemon
//! listening as another user, a bpffs mount made by the supervisor.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
};

use crate::TestNet;

/// The uid and gid the tests use for "another local user".
pub const NOBODY: u32 = 65534;

/// A UDP socket with `SO_REUSEPORT` bound to `address` inside `net`, held by this
/// test process: what another service (or a stray program of the same user) would
/// put into the address's reuseport group.
pub fn reuseport_socket(net: &TestNet, address: SocketAddr) -> OwnedFd {
    net.run_in(|| {
        let family = if address.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .expect("create a UDP socket");
        setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
        bind(fd.as_raw_fd(), &SockaddrStorage::from(address))
            .unwrap_or_else(|e| panic!("bind a reuseport socket to {address}: {e}"));
        fd
    })
}

/// Switches the calling thread's (and only its) credentials to `uid`/`gid` with no
/// supplementary groups, for good.
///
/// The raw syscalls, not libc's `setresuid`: glibc applies those to every thread
/// of the process (and the test harness must stay root). The kernel keeps
/// credentials per thread, so sockets this thread binds or listens on carry `uid`.
pub fn become_user_on_this_thread(uid: u32, gid: u32) {
    crate::sys::set_thread_credentials(uid, gid).unwrap_or_else(|e| {
        panic!("dropping this thread's credentials to {uid}:{gid} failed: {e}")
    });
}

/// A program of another user pretending to be the supervisor: it listens on a
/// control socket path and answers every request with "generation 99 serves".
pub struct FakeDaemon {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    /// Listens at `path` as `uid`/`gid` (the directory must let that user create it).
    pub fn start(path: &Path, uid: u32, gid: u32) -> FakeDaemon {
        FakeDaemon::answering(
            path,
            uid,
            gid,
            "{\"event\":\"done\",\"message\":\"generation 99 serves\"}\n",
        )
    }

    /// The same, answering every request with `answer` (one or more event lines).
    pub fn answering(path: &Path, uid: u32, gid: u32, answer: &'static str) -> FakeDaemon {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let path = path.to_path_buf();
            let stop = stop.clone();
            std::thread::spawn(move || {
                become_user_on_this_thread(uid, gid);
                let listener = match UnixListener::bind(&path) {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("bind {}: {e}", path.display())));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut stream) = stream else { continue };
                    let mut request = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut request);
                    let _ = stream.write_all(answer.as_bytes());
                }
            })
        };
        ready_rx
            .recv()
            .expect("fake daemon thread")
            .unwrap_or_else(|e| panic!("fake daemon: {e}"));
        FakeDaemon {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether `path` is a mount point (listed in this process's mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(canonical) = fs::canonicalize(path) else {
        return false;
    };
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| Path::new(&unescape_mountinfo(mount_point)) == canonical)
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Unmounts whatever is mounted at `path` on drop (lazily, so a test that failed
/// half-way cannot leave a mount behind). Declare it after the directory it
/// guards, so it drops first.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        while is_mount_point(&self.0) {
            if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("umount {}: {e}", self.0.display());
                return;
            }
        }
    }
}

/// `setpriv` arguments that run a program as [`NOBODY`] but with
/// `CAP_DAC_OVERRIDE`: another user who can open the root-only control socket
/// (the daemon must still refuse them by their uid).
pub fn nobody_with_dac_override() -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--inh-caps=+dac_override".into(),
        "--ambient-caps=+dac_override".into(),
        "--".into(),
    ]
}
