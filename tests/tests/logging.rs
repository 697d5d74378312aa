//! The daemon's log shapes (issue 16): JSON lines with `SUPERVISOR_LOG_FORMAT=json`,
//! plain text by default, and, when stderr is the stream `JOURNAL_STREAM` names,
//! the journal (or, with no journald to talk to, sd-daemon `<N>` priority prefixes
//! on stderr). Worker lines carry the generation and the worker's pid as fields.

#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use supervisor_tests::supervisor::worker_pids;
use supervisor_tests::{PinDir, ServiceConfig, Supervisor, TempDir, TestNet, require_root};

const SETTLE: Duration = Duration::from_secs(30);

fn config(pins: &PinDir, runtime: &TempDir) -> ServiceConfig {
    ServiceConfig::echo(
        2,
        "127.0.0.1:5300".parse::<SocketAddr>().unwrap(),
        pins,
        runtime.path(),
    )
}

/// Runs the echo service through `wrapper` until generation 1 is settled, stops it,
/// and returns its stderr and the worker pids.
fn run_with(wrapper: &[&str]) -> (String, Vec<i32>) {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let mut sup = Supervisor::spawn_wrapped(&net, config(&pins, &runtime), wrapper);
    sup.wait_serving(SETTLE);
    let pids = worker_pids(&sup.wait_settled(1, SETTLE), 1);
    sup.stop();
    (sup.logs().1, pids)
}

/// The echo workers share the daemon's stderr and write their own lines.
fn is_workers(line: &str) -> bool {
    line.starts_with("echo-worker")
}

#[test]
fn json_mode_writes_one_object_per_line_with_level_message_and_fields() {
    let (stderr, pids) = run_with(&["env", "SUPERVISOR_LOG_FORMAT=json"]);
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_workers(l))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let level = line["level"]
            .as_str()
            .unwrap_or_else(|| panic!("no level: {line}"));
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
            "{line}"
        );
        assert!(line["message"].is_string(), "no message: {line}");
        assert!(line["timestamp"].is_string(), "no timestamp: {line}");
    }
    for pid in pids {
        let started = lines
            .iter()
            .find(|l| {
                l["worker_pid"].as_i64() == Some(pid as i64)
                    && l["message"].as_str().unwrap().contains("started")
            })
            .unwrap_or_else(|| panic!("no `started` line with worker_pid {pid}:\n{stderr}"));
        assert_eq!(started["generation"].as_u64(), Some(1), "{started}");
        assert!(started["worker"].is_u64(), "{started}");
    }
}

#[test]
fn text_mode_keeps_fields_that_repeat_the_message_out_of_the_line() {
    // A JOURNAL_STREAM that is not stderr (inherited from a unit, say) is ignored.
    let (stderr, pids) = run_with(&["env", "JOURNAL_STREAM=1:1"]);
    let started: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("started, pid"))
        .collect();
    assert_eq!(started.len(), pids.len(), "{stderr}");
    for line in started {
        assert!(line.contains("INFO"), "{line}");
        assert!(!line.contains("worker_pid="), "{line}");
        assert!(!line.starts_with('<'), "{line}");
    }
}

#[test]
fn stderr_named_by_journal_stream_gets_the_journal_or_priority_prefixes() {
    // JOURNAL_STREAM set to stderr's own device:inode, as systemd would.
    let wrapper = [
        "/bin/sh",
        "-c",
        "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec \"$@\"",
        "sh",
    ];
    let (stderr, _) = run_with(&wrapper);
    let journald = std::path::Path::new("/run/systemd/journal/socket").exists();
    if journald {
        // Straight to the journal: nothing on stderr.
        assert!(
            stderr.lines().all(|l| l.trim().is_empty() || is_workers(l)),
            "journald is there, yet logged to stderr:\n{stderr}"
        );
    } else {
        let started: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("started, pid"))
            .collect();
        assert!(!started.is_empty(), "{stderr}");
        for line in stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !is_workers(l))
        {
            assert!(
                ["<3>", "<4>", "<6>", "<7>"]
                    .iter()
                    .any(|p| line.starts_with(p)),
                "no sd-daemon priority prefix: {line}"
            );
            assert!(
                !line.contains('\u{1b}'),
                "colour codes in the journal: {line:?}"
            );
        }
        assert!(started.iter().all(|l| l.starts_with("<6>")), "{started:?}");
    }
}
