//! Readings for tests of what a hostile worker or a control client can cost the
//! daemon: its memory and fds from `/proc`, a worker's credentials, and raw
//! connections to the control socket.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// The `Key:\tvalue` lines of `/proc/<pid>/status`.
pub fn proc_status(pid: u32) -> BTreeMap<String, String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// A `/proc/<pid>/status` size field (`VmRSS`, `VmHWM`, ...) in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = proc_status(pid);
    let value = status
        .get(field)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    value
        .trim_end_matches(" kB")
        .parse()
        .unwrap_or_else(|e| panic!("{field} of {pid}: {value:?}: {e}"))
}

/// Resets `VmHWM` (the peak resident set) of `pid` to its current RSS, so a
/// later `VmHWM` is the peak of what happened in between, however short.
pub fn reset_peak_rss(pid: u32) {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("reset the peak RSS of {pid}: {e}"));
}

/// `(fd, link target)` of every open fd of `pid`, sorted by fd.
pub fn open_fds(pid: u32) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("list /proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(entry.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    fds.sort();
    fds
}

/// A python3 interpreter that any user (a worker running as `nobody`) may run:
/// the one on PATH may live under root's home (pyenv), which others cannot enter.
pub fn python3_for_any_user() -> PathBuf {
    let candidates = [crate::python3_path(), PathBuf::from("/usr/bin/python3")];
    candidates
        .into_iter()
        .find(|p| world_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "no python3 that every user may run (tried python3 on PATH and /usr/bin/python3)"
            )
        })
}

/// Whether every directory above `path` is searchable by others and the file
/// itself executable by others.
fn world_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(path) = fs::canonicalize(path) else {
        return false;
    };
    let mode = |p: &Path| fs::metadata(p).map(|m| m.permissions().mode()).unwrap_or(0);
    mode(&path) & 0o001 != 0 && path.ancestors().skip(1).all(|dir| mode(dir) & 0o001 != 0)
}

/// A raw connection to a daemon's control socket, for requests the CLI would
/// never send.
pub struct ControlConnection {
    stream: UnixStream,
}

impl ControlConnection {
    /// Connects; panics if the daemon cannot be reached.
    pub fn open(socket: &Path) -> ControlConnection {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        ControlConnection { stream }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Writes `bytes`; the error if the daemon closed the connection meanwhile.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads event lines until the daemon closes the connection (or a read fails,
    /// e.g. with ECONNRESET after it closed with our bytes unread), waiting at most
    /// `timeout` for each. Panics on a line that is not JSON.
    pub fn events(&mut self, timeout: Duration) -> Vec<Value> {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("set a read timeout");
        let mut events = Vec::new();
        let mut reader = BufReader::new(&self.stream);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => return events,
                Ok(_) => events.push(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("event line {line:?} is not JSON: {e}")),
                ),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("no event within {timeout:?} (so far: {events:?})")
                }
                Err(_) => return events,
            }
        }
    }
}
