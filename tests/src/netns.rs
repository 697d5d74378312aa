//! One network namespace per test.
//!
//! Every test gets its own named namespace, so listeners can use fixed ports, tests run
//! in parallel without seeing each other's traffic, and nothing a test sends can leave
//! the machine: the namespace has only `lo` (and, for [`TestNet::pair`], one veth to its
//! peer namespace).

use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// `ip netns add` mounts /run/netns on first use; concurrent first calls race on that
/// mount, so namespace creation and removal are serialized within the process.
static IP_NETNS_LOCK: Mutex<()> = Mutex::new(());

/// The veth end inside a namespace made by [`TestNet::pair`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Veth {
    /// Interface name inside this namespace (`veth-a` or `veth-b`).
    pub ifname: String,
    /// This end's address (10.200.X.1 or 10.200.X.2), prefix /24.
    pub addr: Ipv4Addr,
    /// The other end's address.
    pub peer_addr: Ipv4Addr,
}

/// A named network namespace, deleted (with everything started in it) on drop.
#[derive(Debug)]
pub struct TestNet {
    name: String,
    /// Open handle on /run/netns/NAME (CLOEXEC), used for setns in threads and children.
    fd: OwnedFd,
    /// Process groups started through [`TestNet::spawn`].
    pgids: Mutex<Vec<i32>>,
    veth: Option<Veth>,
}

impl TestNet {
    /// Creates `sup-<pid>-<counter>-<random>` with `lo` up.
    pub fn new() -> TestNet {
        crate::require_root();
        let name = format!("sup-{}", crate::unique_suffix());
        {
            let _g = IP_NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            ip(&["netns", "add", &name]);
        }
        let path = PathBuf::from("/run/netns").join(&name);
        let fd: OwnedFd = fs::File::open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
            .into();
        let net = TestNet {
            name,
            fd,
            pgids: Mutex::new(Vec::new()),
            veth: None,
        };
        ip(&["-n", &net.name, "link", "set", "lo", "up"]);
        net
    }

    /// Two namespaces joined by a veth pair: `a` has `veth-a` = 10.200.X.1/24, `b` has
    /// `veth-b` = 10.200.X.2/24, both up.
    ///
    /// X only has to be unique within this process (a per-process counter, offset by the
    /// pid to make overlap between concurrent processes unlikely); the addresses never
    /// exist outside these two namespaces, so even a collision could not cross-talk.
    pub fn pair() -> (TestNet, TestNet) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let x = (std::process::id()
            .wrapping_mul(7)
            .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
            % 250)
            + 1;
        let mut a = TestNet::new();
        let mut b = TestNet::new();
        let addr_a = Ipv4Addr::new(10, 200, x as u8, 1);
        let addr_b = Ipv4Addr::new(10, 200, x as u8, 2);
        // Created directly inside the namespaces: the interface names never exist in the
        // host namespace, so fixed names cannot collide between tests.
        ip(&[
            "-n", &a.name, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
            "netns", &b.name,
        ]);
        for (net, ifname, addr) in [(&a, "veth-a", addr_a), (&b, "veth-b", addr_b)] {
            ip(&[
                "-n",
                &net.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                ifname,
            ]);
            ip(&["-n", &net.name, "link", "set", ifname, "up"]);
        }
        a.veth = Some(Veth {
            ifname: "veth-a".into(),
            addr: addr_a,
            peer_addr: addr_b,
        });
        b.veth = Some(Veth {
            ifname: "veth-b".into(),
            addr: addr_b,
            peer_addr: addr_a,
        });
        (a, b)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The veth end, for namespaces made by [`TestNet::pair`].
    pub fn veth(&self) -> Option<&Veth> {
        self.veth.as_ref()
    }

    /// A command that runs `program` inside the namespace, in a new process group.
    ///
    /// This is `ip netns exec NAME program` without its side effect: `ip netns exec` also
    /// unshares the mount namespace and mounts a fresh sysfs on /sys, which hides the
    /// bpffs at /sys/fs/bpf. The supervisor would then pin into a private bpffs that the
    /// test (and a restarted supervisor) cannot see. So the child only `setns`es the
    /// network namespace between fork and exec, like `nsenter --net`.
    ///
    /// The new process group lets drop (and [`crate::Supervisor`]) kill the program and
    /// everything it forked in one signal. Spawn it with [`TestNet::spawn`] to have it
    /// killed when the namespace is dropped.
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.process_group(0);
        let netns = self
            .fd
            .try_clone()
            .unwrap_or_else(|e| panic!("dup the fd of netns {}: {e}", self.name));
        crate::sys::exec_in_netns(&mut cmd, netns);
        cmd
    }

    /// Spawns a command (normally from [`TestNet::exec`]) and remembers its process group
    /// so drop kills it.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?} in netns {}: {e}", self.name));
        self.pgids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id() as i32);
        child
    }

    /// Moves the calling thread into the namespace, for good: sockets it creates from now
    /// on live there (and threads it spawns start there). Prefer [`TestNet::run_in`],
    /// which does this on a throw-away thread.
    pub fn enter_current_thread(&self) {
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its result (a panic in
    /// `f` is re-raised here). Sockets `f` creates stay in the namespace after it returns.
    pub fn run_in<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|s| {
            let h = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(s, || {
                    self.enter_current_thread();
                    f()
                })
                .expect("spawn netns thread");
            match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// Pids of all processes in the namespace (not counting this test process).
    pub fn pids(&self) -> Vec<i32> {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output();
        let me = std::process::id() as i32;
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|&p| p != me)
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// `(pid, command line)` of every process in the namespace (arguments joined by
    /// spaces), for checking what is still running there. Processes that exit while
    /// this runs are skipped.
    pub fn cmdlines(&self) -> Vec<(i32, String)> {
        self.pids()
            .into_iter()
            .filter_map(|pid| {
                let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let args: Vec<String> = raw
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                Some((pid, args.join(" ")))
            })
            .collect()
    }

    /// Kills every process in the namespace: first the process groups we started, then
    /// anything else still inside (workers that left their group). Only pids currently in
    /// this namespace are signalled, so a recycled pid elsewhere is never hit.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let pgids = self.pgids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for &pg in &pgids {
                if pids.contains(&pg) {
                    let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
                }
            }
            for &p in &pids {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "netns {}: processes still present after SIGKILL: {pids:?}",
                    self.name
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Default for TestNet {
    fn default() -> Self {
        TestNet::new()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.kill_all();
        let _g = IP_NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let out = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other => eprintln!("ip netns del {}: {other:?}", self.name),
        }
    }
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run `ip {}` (is iproute2 installed?): {e}", args.join(" ")));
    if !out.status.success() {
        panic!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}
