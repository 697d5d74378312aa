//! `supervisor reexec` checks the binary before it execs it (`handoff-check`): a
//! binary that is not a compatible supervisor, or pins the new image could not
//! adopt, are refused (exit 2, one line naming the binary and what is wrong) and
//! the running supervisor is untouched: same pid and image, same generation
//! serving, nothing left in the runtime directory, no fd left inheritable, and
//! traffic served throughout.

#![deny(unsafe_code)]

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use supervisor_tests::{
    BackgroundLoad, LoadConfig, PinDir, ServiceConfig, Supervisor, TempDir, TestNet, bin_path,
    require_root, supervisor::single_error_line,
};

/// A script file at `dir/name` with `body`, executable.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The daemon's fds that a new image would inherit (no close-on-exec), besides
/// stdin, stdout and stderr.
fn inheritable_fds(pid: u64) -> Vec<String> {
    let mut open = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let fd = entry.file_name().to_string_lossy().to_string();
        if ["0", "1", "2"].contains(&fd.as_str()) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        if flags & 0o2000000 == 0 {
            open.push(fd);
        }
    }
    open
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(needle)
        {
            found.push(entry.file_name().to_string_lossy().to_string());
        }
    }
    found
}

struct Untouched {
    pid: Value,
    image: Value,
    serving: u32,
    workers: Vec<i32>,
    runtime: Vec<PathBuf>,
    /// What the launcher handed the daemon without close-on-exec, if anything: a
    /// refused re-exec leaves the same set, not more.
    inheritable: Vec<String>,
}

impl Untouched {
    fn snapshot(supervisor: &Supervisor, runtime: &Path) -> Untouched {
        let status = supervisor.status_json();
        let mut files: Vec<PathBuf> = std::fs::read_dir(runtime)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        Untouched {
            pid: status["pid"].clone(),
            image: status["image_started_unix_ms"].clone(),
            serving: supervisor.serving_generation(),
            workers: supervisor_tests::supervisor::worker_pids(&status, 1),
            inheritable: inheritable_fds(status["pid"].as_u64().unwrap()),
            runtime: files,
        }
    }

    fn assert_same(&self, supervisor: &Supervisor, runtime: &Path, case: &str) {
        let now = Untouched::snapshot(supervisor, runtime);
        assert_eq!(now.pid, self.pid, "{case}: the supervisor's pid changed");
        assert_eq!(now.image, self.image, "{case}: a new image runs");
        assert_eq!(
            now.serving, self.serving,
            "{case}: another generation serves"
        );
        assert_eq!(now.workers, self.workers, "{case}: workers were replaced");
        assert_eq!(
            now.runtime, self.runtime,
            "{case}: runtime directory changed"
        );
        assert_eq!(
            now.inheritable, self.inheritable,
            "{case}: fds left without close-on-exec"
        );
    }
}

/// Runs `supervisor reexec --binary binary`: must be refused with exit 2 and one
/// error line naming the binary and containing `why`.
fn assert_refused(supervisor: &Supervisor, binary: &Path, why: &str) {
    let output = supervisor
        .cli(&["reexec", "--binary", &binary.to_string_lossy()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}: {stderr}{}",
        binary.display(),
        String::from_utf8_lossy(&output.stdout)
    );
    let line = single_error_line(&stderr);
    assert!(
        line.contains(&binary.to_string_lossy().to_string()) && line.contains(why),
        "{}: expected one line naming it and saying {why:?}, got {stderr:?}",
        binary.display()
    );
}

#[test]
fn reexec_refuses_what_is_not_a_compatible_supervisor() {
    require_root();
    let net = TestNet::new();
    let pins = PinDir::new();
    let run = TempDir::new("reexec-refusals");
    let scripts = TempDir::new("reexec-candidates");
    let config = ServiceConfig::echo(2, "127.0.0.1:6000".parse().unwrap(), &pins, run.path());
    let target = config.address;
    let mut supervisor = Supervisor::start(&net, config);
    let before = Untouched::snapshot(&supervisor, run.path());

    // Served throughout, the check that times out (which holds the event loop)
    // included.
    let mut load = LoadConfig::new(target);
    load.rate = Some(2000);
    load.duration = Some(Duration::from_secs(16));
    let background = BackgroundLoad::start(&net, load);

    assert_refused(&supervisor, Path::new("/bin/true"), "not a supervisor");
    before.assert_same(&supervisor, run.path(), "/bin/true");

    let garbage = script(scripts.path(), "garbage", "echo 'hello, I am not JSON'");
    assert_refused(&supervisor, &garbage, "hello, I am not JSON");
    before.assert_same(&supervisor, run.path(), "garbage");

    let hangs = script(scripts.path(), "hangs", "sleep 600");
    assert_refused(&supervisor, &hangs, "no answer within");
    before.assert_same(&supervisor, run.path(), "hangs");
    assert_eq!(
        processes_mentioning(&hangs.to_string_lossy()),
        Vec::<String>::new(),
        "the hanging candidate was left running"
    );

    // Stands in for a supervisor build with another handoff format.
    let other_format = script(
        scripts.path(),
        "other-format",
        &format!(
            "SUPERVISOR_TEST_FAKE_HANDOFF_FORMAT=999 exec {} \"$@\"",
            bin_path("supervisor").display()
        ),
    );
    assert_refused(&supervisor, &other_format, "reads handoff format 999");
    before.assert_same(&supervisor, run.path(), "other format");

    // A pin of the running service deleted: the new image could not adopt it.
    let flows = pins.path().join("echo").join("echo").join("flows");
    std::fs::remove_file(&flows).unwrap();
    assert_refused(&supervisor, &bin_path("supervisor"), "flows is missing");
    before.assert_same(&supervisor, run.path(), "deleted pin");

    let report = background.finish();
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.duplicated, 0, "{report}");

    supervisor.stop();
    pins.assert_empty_after_stop();
}

/// With `[xdp]`, the check covers the filter's pins too: all there, the re-exec
/// goes ahead; one missing, it is refused.
#[test]
fn reexec_checks_the_xdp_filters_pins() {
    require_root();
    let (server, _client) = TestNet::pair();
    let pins = PinDir::new();
    let run = TempDir::new("reexec-xdp");
    let listen = std::net::SocketAddr::new(server.veth().unwrap().addr.into(), 5600);
    let mut config = ServiceConfig::echo(2, listen, &pins, run.path());
    config.extra_toml = "[xdp]\ninterface = \"veth-a\"\n".into();
    let mut supervisor = Supervisor::start(&server, config);
    let supervisor_bin = bin_path("supervisor");

    let output = supervisor
        .cli(&["reexec", "--binary", &supervisor_bin.to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let before = Untouched::snapshot(&supervisor, run.path());
    let rate = pins
        .path()
        .join("echo")
        .join("xdp")
        .join("veth-a")
        .join("rate");
    std::fs::remove_file(&rate).unwrap();
    assert_refused(&supervisor, &supervisor_bin, "rate is missing");
    before.assert_same(&supervisor, run.path(), "deleted XDP pin");
    supervisor.stop();
    // PinDir's drop removes the XDP pins (kept by a stop by design), which
    // detaches the filter.
}
