//! What /proc says about a process and the machine.

use std::fs;
use std::time::{Duration, Instant};

/// Resident memory (VmRSS) in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU time used so far (utime + stime of all threads), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: the fields after
    // it start behind the last ')'. utime and stime are fields 14 and 15.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_nanos(
        (utime + stime) * 1_000_000_000 / clock_ticks(),
    ))
}

/// Time all threads of `pid` spent on a CPU, in nanoseconds: the first field of
/// /proc/PID/task/TID/schedstat, summed. The same quantity as [`cpu_time`] without its
/// clock-tick rounding (10 ms), which would show an almost idle process as 0 or 1 tick.
pub fn run_time(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    for e in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(text) = fs::read_to_string(e.path().join("schedstat")) else {
            continue; // a thread that just exited
        };
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// What a [`CpuMeter`] measured.
#[derive(Clone, Copy, Debug)]
pub struct CpuUse {
    /// utime + stime (/proc/PID/stat), clock-tick resolution.
    pub cpu: Duration,
    /// Run time from schedstat, nanosecond resolution.
    pub run: Duration,
    pub wall: Duration,
}

impl CpuUse {
    /// Run time as a percentage of one core.
    pub fn percent(&self) -> f64 {
        self.run.as_secs_f64() * 100.0 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// CPU use of `pid` over a stretch of time: start it, do something, call `finish`.
pub struct CpuMeter {
    pid: u32,
    cpu: Duration,
    run: Duration,
    wall: Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Option<CpuMeter> {
        Some(CpuMeter {
            pid,
            cpu: cpu_time(pid)?,
            run: run_time(pid)?,
            wall: Instant::now(),
        })
    }

    /// What was used since `start`.
    pub fn finish(&self) -> Option<CpuUse> {
        Some(CpuUse {
            cpu: cpu_time(self.pid)?.saturating_sub(self.cpu),
            run: run_time(self.pid)?.saturating_sub(self.run),
            wall: self.wall.elapsed(),
        })
    }
}

/// Time CPU `cpu` has been busy since boot, from its line in /proc/stat: user, nice,
/// system, irq and softirq (idle, iowait and steal left out), in clock ticks
/// ([`clock_ticks`]) turned into a duration.
///
/// Without `CONFIG_IRQ_TIME_ACCOUNTING` the kernel samples softirq time at each tick, so
/// this is statistical at tick resolution, but it counts the kernel's packet processing
/// on that CPU, which no per-process figure shows.
pub fn cpu_busy(cpu: usize) -> Option<Duration> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    cpu_busy_in(&text, cpu)
}

fn cpu_busy_in(stat: &str, cpu: usize) -> Option<Duration> {
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    Some(Duration::from_nanos(busy * 1_000_000_000 / clock_ticks()))
}

/// `Udp: RcvbufErrors` of the calling thread's network namespace (datagrams dropped
/// because a socket's receive buffer was full), from /proc/thread-self/net/snmp: the
/// thread's own namespace, where /proc/net would show the process's.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let text = fs::read_to_string("/proc/thread-self/net/snmp").ok()?;
    snmp_field(&text, "Udp", "RcvbufErrors")
}

fn snmp_field(text: &str, proto: &str, field: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Clock ticks per second: the resolution of [`cpu_time`].
pub fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as u64,
        _ => 100,
    }
}

/// One line about the machine: CPUs, CPU model, kernel.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let uts = nix::sys::utsname::uname().ok();
    let kernel = uts
        .as_ref()
        .map(|u| {
            format!(
                "{} {} {}",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy(),
                u.machine().to_string_lossy()
            )
        })
        .unwrap_or_else(|| "unknown kernel".into());
    format!("{cpus} CPUs ({model}), {kernel}")
}

/// The git commit of the workspace, with `+dirty` when the tree has changes; `None`
/// when git is not there.
pub fn git_revision() -> Option<String> {
    let root = crate::workspace_root();
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["describe", "--always", "--dirty=+dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_snmp() {
        let stat =
            "cpu  10 0 5 100 0 0 0 0 0 0\ncpu0 4 1 2 50 7 1 2 9 0 0\ncpu1 6 0 3 50 0 0 0 0 0 0\n";
        let tick = Duration::from_nanos(1_000_000_000 / clock_ticks());
        assert_eq!(cpu_busy_in(stat, 0), Some(tick * 10));
        assert_eq!(cpu_busy_in(stat, 1), Some(tick * 9));
        assert_eq!(cpu_busy_in(stat, 2), None);
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 100 2 3 40 17 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 0 0\n";
        assert_eq!(snmp_field(snmp, "Udp", "RcvbufErrors"), Some(17));
        assert_eq!(snmp_field(snmp, "UdpLite", "RcvbufErrors"), Some(0));
        assert_eq!(snmp_field(snmp, "Udp", "Nope"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        let meter = CpuMeter::start(me).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let used = meter.finish().unwrap();
        // Only "it moved": the other test threads of this process run meanwhile, so
        // the process's CPU time may well exceed the wall time.
        assert!(used.wall >= Duration::from_millis(50));
        assert!(used.run > Duration::ZERO && used.percent() > 0.0);
        assert!(machine().contains("CPUs"));
        assert!(cpu_busy(0).is_some());
        assert!(udp_rcvbuf_errors().is_some());
        assert!(clock_ticks() > 0);
        std::hint::black_box(x);
    }
}
