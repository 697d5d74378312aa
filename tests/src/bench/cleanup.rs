//! Cleaning up after the demo and the benchmark when they do not end normally.
//!
//! On a normal end (and on a panic, which unwinds) the harness' own drops remove every
//! namespace, pin directory and temporary directory. Ctrl-C does not unwind, so
//! [`install_signal_cleanup`] turns SIGINT/SIGTERM/SIGHUP into a cleanup of everything
//! this process created, found by name: the harness names all of it
//! `...-<pid>-<counter>-<random>` ([`crate::unique_suffix`]), so nothing of another
//! process (a concurrent test run) is ever touched.

use std::fs;
use std::path::Path;
use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::pins::BPFFS_ROOT;

/// Catches SIGINT, SIGTERM and SIGHUP on a thread of their own; on one, removes this
/// process's leftovers and exits with 128 + signal.
///
/// Handlers (signal-hook's self-pipe), not a blocked signal mask with `sigwait`: the mask
/// would be inherited by every program started from here (std keeps it across exec),
/// and a supervisor with SIGTERM blocked never stops. Handlers are reset by exec.
pub fn install_signal_cleanup(program: &'static str) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .expect("install signal handlers");
    std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            let Some(signal) = signals.forever().next() else {
                return;
            };
            let name =
                Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string());
            eprintln!("\n{program}: {name}, cleaning up (namespaces, pins, temporary files)...");
            for line in remove_own_leftovers() {
                eprintln!("{program}:   {line}");
            }
            eprintln!("{program}: cleaned up");
            std::process::exit(128 + signal);
        })
        .expect("spawn the signal thread");
}

/// Whether `name` ends in `-<our pid>-<counter>-<8 hex digits>` (the harness'
/// [`crate::unique_suffix`]) after `prefix`.
fn is_ours(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let parts: Vec<&str> = rest.rsplitn(3, '-').collect();
    // rsplitn from the right: [random, counter, "...-pid" or "pid"].
    if parts.len() != 3 || parts[0].len() != 8 || parts[1].parse::<u64>().is_err() {
        return false;
    }
    let pid = parts[2].rsplit('-').next().unwrap_or("");
    pid == std::process::id().to_string()
}

/// Kills everything in this process's network namespaces and deletes them, removes its
/// pin directories under /sys/fs/bpf and its temporary directories. Returns one line per
/// thing removed. Safe to call when nothing is left.
pub fn remove_own_leftovers() -> Vec<String> {
    let mut done = Vec::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|n| is_ours(n, "sup-"))
            .collect();
        for name in names {
            // Processes first: a namespace with live processes outlives `ip netns del`
            // and keeps their sockets (and the service's port) alive.
            for _ in 0..50 {
                let pids: Vec<i32> = Command::new("ip")
                    .args(["netns", "pids", &name])
                    .output()
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .split_whitespace()
                            .filter_map(|p| p.parse().ok())
                            .filter(|&p| p != std::process::id() as i32)
                            .collect()
                    })
                    .unwrap_or_default();
                if pids.is_empty() {
                    break;
                }
                for p in pids {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            done.push(format!("removed network namespace {name}"));
        }
    }
    for (dir, prefix) in [
        (Path::new(BPFFS_ROOT), "sup-test-"),
        (std::env::temp_dir().as_path(), "sup-"),
    ] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_ours(&name, prefix) && fs::remove_dir_all(e.path()).is_ok() {
                done.push(format!("removed {}", e.path().display()));
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_only_our_names() {
        let me = std::process::id();
        assert!(is_ours(&format!("sup-{me}-3-0badf00d"), "sup-"));
        assert!(is_ours(&format!("sup-run-{me}-12-0badf00d"), "sup-"));
        assert!(is_ours(&format!("sup-test-{me}-0-0badf00d"), "sup-test-"));
        assert!(!is_ours(&format!("sup-{}-3-0badf00d", me + 1), "sup-"));
        assert!(!is_ours(&format!("sup-run-1{me}-3-0badf00d"), "sup-"));
        assert!(!is_ours(&format!("sup-{me}-x-0badf00d"), "sup-"));
        assert!(!is_ours("mtest", "sup-"));
    }
}
