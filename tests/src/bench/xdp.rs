//! The pieces of the XDP figure: a veth pair set up for a flood, CPU pinning, receive
//! steering, and the user-space baseline that reads and discards.
//!
//! Where packet work runs on a veth pair: the sender's `sendmmsg` hands each datagram to
//! `veth-b`, whose transmit delivers it to `veth-a` on the sending CPU. With an XDP
//! program in native mode, veth runs it in its NAPI poll, scheduled on that same CPU; in
//! generic mode, and for everything that is not dropped at XDP, the datagram goes
//! through the receive backlog, which Receive Packet Steering (RPS) can move to another
//! CPU. So with RPS pointing at the receiving CPU, the user-space path (IP, UDP, the
//! socket queue, the reader) and a generic-mode filter both run on that one CPU, while a
//! native-mode filter runs on the sender's.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::socket::{setsockopt, sockopt};
use nix::unistd::Pid;

use crate::netns::ip;
use crate::{LoadConfig, Report, TestNet, loadgen, output_with_timeout};

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread (and the threads it starts from now on) to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), String> {
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("pin to CPU {cpu}: {e}"))
}

/// The MAC address of `ifname` in `net`.
pub fn mac(net: &TestNet, ifname: &str) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(["-n", net.name(), "link", "show", "dev", ifname])
        .output()
        .map_err(|e| format!("ip link show: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("no MAC address for {ifname}: {}", text.trim()))
}

/// A permanent neighbour entry in `net` for `addr` (IPv4 or IPv6) on `ifname`: a flood
/// must not start in (and overflow) the ARP or neighbour discovery queue.
pub fn permanent_neighbour(net: &TestNet, ifname: &str, addr: IpAddr, lladdr: &str) {
    ip(&[
        "-n",
        net.name(),
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        lladdr,
        "dev",
        ifname,
        "nud",
        "permanent",
    ]);
}

/// Adds `addr`/64 to `ifname` in `net` without duplicate address detection, so it is
/// usable at once (a tentative address cannot be bound).
pub fn add_ipv6_nodad(net: &TestNet, ifname: &str, addr: Ipv6Addr) {
    ip(&[
        "-n",
        net.name(),
        "addr",
        "add",
        &format!("{addr}/64"),
        "dev",
        ifname,
        "nodad",
    ]);
}

/// Receive Packet Steering: the receive backlog of every queue of `ifname` in `net` is
/// processed on `cpu`.
///
/// Written through a sysfs of the namespace's own, mounted in a private mount namespace
/// of a short-lived `unshare` started in the network namespace (the host's /sys shows
/// only the host's interfaces, and nothing is mounted where anyone else could see it).
pub fn steer_receive_to(net: &TestNet, ifname: &str, cpu: usize) -> Result<(), String> {
    if cpu >= 32 {
        return Err(format!(
            "CPU {cpu} does not fit the one-word mask written here"
        ));
    }
    if !ifname
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("unexpected interface name {ifname:?}"));
    }
    let script = format!(
        "mount -t sysfs sysfs /sys && for q in /sys/class/net/{ifname}/queues/rx-*; do echo {:x} > \"$q/rps_cpus\" || exit 1; done",
        1u32 << cpu
    );
    let mut cmd = net.exec("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = output_with_timeout(&mut cmd, Duration::from_secs(10));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "setting rps_cpus failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether an XDP program is attached to `ifname` in `net` (`ip link` shows `prog/xdp`).
pub fn xdp_attached(net: &TestNet, ifname: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", net.name(), "link", "show", "dev", ifname])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
        .unwrap_or(false)
}

/// Waits until no XDP program is attached to `ifname` (a link whose last pin and fd
/// are gone is released by the kernel shortly after, not at once); false at `timeout`.
pub fn wait_detached(net: &TestNet, ifname: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !xdp_attached(net, ifname) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One sending socket in `client`, flat out for `duration`, its threads pinned to
/// `cpu` when given. Nothing answers a discarded datagram, so replies get only a short
/// grace.
pub fn flood(
    client: &TestNet,
    target: SocketAddr,
    duration: Duration,
    cpu: Option<usize>,
) -> io::Result<Report> {
    client.run_in(|| {
        if let Some(cpu) = cpu {
            pin_current_thread(cpu).map_err(io::Error::other)?;
        }
        loadgen::run(
            &LoadConfig::new(target)
                .senders(1)
                .duration(duration)
                .flat_out()
                .grace(Duration::from_millis(100)),
        )
    })
}

/// What the user-space baseline read.
#[derive(Clone, Copy, Debug)]
pub struct Discarded {
    /// Datagrams the reader received (and threw away).
    pub read: u64,
    /// Datagrams the kernel dropped because the socket's buffer was full
    /// (`Udp: RcvbufErrors` of the namespace), if readable.
    pub rcvbuf_errors: Option<u64>,
}

/// The user-space baseline: a plain UDP socket bound to `target` in `server` (receive
/// buffer `rcvbuf`, set with SO_RCVBUFFORCE), and one thread, pinned to `cpu` when given,
/// that reads datagrams one `recv` at a time and throws them away, while `during` runs
/// (the flood); it keeps reading until the socket has been quiet for 100 ms after.
pub fn read_and_discard<R>(
    server: &TestNet,
    target: SocketAddr,
    rcvbuf: usize,
    cpu: Option<usize>,
    during: impl FnOnce() -> R,
) -> Result<(Discarded, R), String> {
    let socket = server
        .run_in(|| -> io::Result<UdpSocket> {
            let s = UdpSocket::bind(target)?;
            setsockopt(&s, sockopt::RcvBufForce, &rcvbuf)?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })
        .map_err(|e| format!("bind {target}: {e}"))?;
    let drops_before = server.run_in(crate::bench::procfs::udp_rcvbuf_errors);
    let started = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let (read, result) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            if let Some(cpu) = cpu {
                let _ = pin_current_thread(cpu);
            }
            started.store(true, Ordering::Release);
            let mut buf = [0u8; 2048];
            let mut n = 0u64;
            loop {
                match socket.recv(&mut buf) {
                    Ok(_) => n += 1,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The read timeout: quiet for 100 ms.
                    Err(_) if done.load(Ordering::Acquire) => return n,
                    Err(_) => {}
                }
            }
        });
        while !started.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let result = during();
        done.store(true, Ordering::Release);
        (reader.join(), result)
    });
    let read = read.map_err(|_| "the reader thread panicked".to_string())?;
    let drops_after = server.run_in(crate::bench::procfs::udp_rcvbuf_errors);
    Ok((
        Discarded {
            read,
            rcvbuf_errors: drops_before
                .zip(drops_after)
                .map(|(b, a)| a.saturating_sub(b)),
        },
        result,
    ))
}

/// Pids of the kernel threads whose name starts with `napi/<ifname>-` (threaded NAPI;
/// the name is cut at 15 bytes like every thread name).
pub fn napi_threads(ifname: &str) -> Vec<u32> {
    let prefix: String = format!("napi/{ifname}-").chars().take(15).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end().starts_with(&prefix))
        })
        .collect()
}

/// Gives `ifname`'s NAPI instances in `net` kernel threads of their own
/// (`/sys/class/net/<ifname>/threaded`, written from a sysfs mounted for `net`, which
/// `ip netns exec` provides) and pins those threads to `cpu`. Returns their pids:
/// the `napi/<ifname>-*` threads that did not exist before (other namespaces may have
/// an interface of the same name). Needs NAPI enabled, i.e. a native XDP program on a
/// veth.
pub fn threaded_napi_on(net: &TestNet, ifname: &str, cpu: usize) -> Result<Vec<u32>, String> {
    let before = napi_threads(ifname);
    let write = |v: u8| {
        output_with_timeout(
            std::process::Command::new("ip").args([
                "netns",
                "exec",
                net.name(),
                "sh",
                "-c",
                &format!("echo {v} > /sys/class/net/{ifname}/threaded"),
            ]),
            Duration::from_secs(10),
        )
    };
    // Off first: a thread left from an earlier program on this interface is replaced.
    let _ = write(0);
    let out = write(1);
    if !out.status.success() {
        return Err(format!(
            "threaded NAPI on {ifname}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let ours: Vec<u32> = napi_threads(ifname)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if ours.is_empty() {
        return Err(format!(
            "no new napi/{ifname}-* thread after `threaded = 1`"
        ));
    }
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    for &pid in &ours {
        sched_setaffinity(Pid::from_raw(pid as i32), &set)
            .map_err(|e| format!("pin napi thread {pid} to CPU {cpu}: {e}"))?;
    }
    Ok(ours)
}

/// The index of `ifname` in `net`.
pub fn ifindex(net: &TestNet, ifname: &str) -> Result<u32, String> {
    net.run_in(|| nix::net::if_::if_nametoindex(ifname))
        .map_err(|e| format!("ifindex of {ifname}: {e}"))
}
