//! The supervisor's own process metrics, read from `/proc/self` at scrape time
//! (prometheus-client has no process collector).
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::{Registry, Unit},
};

/// What `/proc/self` says; `None` where it could not be read.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub threads: Option<u64>,
}

/// User + system CPU time from a `/proc/<pid>/stat` line, in clock ticks.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields are
    // counted from the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS:`, `VmSize:`), in bytes; or a
/// plain count (`Threads:`).
pub fn status_field(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut words = line[key.len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    Some(match words.next() {
        Some("kB") => value * 1024,
        _ => value,
    })
}

pub fn sample() -> ProcessSample {
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100) as f64;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    ProcessSample {
        cpu_seconds: cpu_ticks(&stat).map(|t| t as f64 / ticks_per_second),
        resident_bytes: status_field(&status, "VmRSS:"),
        virtual_bytes: status_field(&status, "VmSize:"),
        threads: status_field(&status, "Threads:"),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
    }
}

pub fn register(registry: &mut Registry) {
    let s = sample();
    if let Some(cpu) = s.cpu_seconds {
        let counter = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        counter.inc_by(cpu);
        registry.register_with_unit(
            "process_cpu",
            "User and system CPU time the supervisor used",
            Unit::Seconds,
            counter,
        );
    }
    for (name, help, unit, value) in [
        (
            "process_resident_memory",
            "Resident memory of the supervisor (VmRSS)",
            Some(Unit::Bytes),
            s.resident_bytes,
        ),
        (
            "process_virtual_memory",
            "Virtual memory of the supervisor (VmSize)",
            Some(Unit::Bytes),
            s.virtual_bytes,
        ),
        (
            "process_open_fds",
            "File descriptors the supervisor holds (sockets of every live generation included)",
            None,
            s.open_fds,
        ),
        (
            "process_threads",
            "Threads of the supervisor process",
            None,
            s.threads,
        ),
    ] {
        let Some(value) = value else { continue };
        let gauge = Gauge::<i64>::default();
        gauge.set(value as i64);
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, gauge),
            None => registry.register(name, help, gauge),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 12345 1000000 200 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_status_fields() {
        let status = "Name:\tsupervisor\nVmSize:\t   10000 kB\nVmRSS:\t    8804 kB\nThreads:\t3\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(8804 * 1024));
        assert_eq!(status_field(status, "Threads:"), Some(3));
        assert_eq!(status_field(status, "VmSwap:"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample();
        assert!(s.resident_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() >= 3);
        assert!(s.cpu_seconds.is_some());
    }
}
