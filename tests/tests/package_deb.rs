//! The Debian package, installed and run under a real systemd as PID 1.
//!
//! Packs the binaries under test (`scripts/package.sh --no-build`: the debug build, or
//! the release one with `SUPERVISOR_BIN_DIR=target/release`), boots a container of this
//! machine's own `/` (tests/src/systemd_container.rs: everything written inside, `dpkg -i`
//! included, lands in the container's tmpfs overlay), installs the `.deb` with `dpkg -i`,
//! and runs the installed unit `udp-supervisor@echo` from the installed files only:
//! /usr/bin/supervisor, /lib/systemd/system/udp-supervisor@.service, a config at
//! /etc/supervisor/echo.toml. Start, a reload under load (0 lost), stop (no process, no
//! pin); the man pages and completions are where `man` and bash look for them; `dpkg -r`
//! removes it all again.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use supervisor_tests::supervisor::{generation_numbers, selected_total, serving_generation};
use supervisor_tests::{
    BackgroundLoad, LoadConfig, Report, Rootfs, ServiceConfig, SystemdContainer, bin_path,
    workspace_root,
};

const ADDR: &str = "127.0.0.1:5300";
const UNIT: &str = "udp-supervisor@echo.service";
const CONFIG_PATH: &str = "/etc/supervisor/echo.toml";
const RUNTIME_DIR: &str = "/run/supervisor";
const BPFFS: &str = "/sys/fs/bpf/supervisor";
const WAIT: Duration = Duration::from_secs(60);

/// `scripts/package.sh --no-build` for the profile whose binaries the tests run;
/// returns the `.deb`'s path (under the workspace, which the container sees read-only at
/// the same path).
fn build_package() -> PathBuf {
    let bin_dir = bin_path("supervisor")
        .parent()
        .expect("binaries have a directory")
        .to_path_buf();
    let target = bin_dir.parent().expect("target/<profile>").to_path_buf();
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("scripts/package.sh"))
        .args(["--no-bootstrap", "--no-build"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(workspace_root());
    if bin_dir.file_name().is_some_and(|n| n == "debug") {
        cmd.arg("--debug");
    }
    let out = cmd.output().expect("run scripts/package.sh");
    assert!(
        out.status.success(),
        "scripts/package.sh failed ({}); it needs cargo-deb (scripts/bootstrap.sh) and \
         `cargo build --bins`:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("package.sh prints the .deb's path")
            .trim(),
    );
    assert!(deb.is_file(), "{} missing", deb.display());
    deb
}

fn config(command: Vec<String>) -> ServiceConfig {
    ServiceConfig::at(
        "echo",
        command,
        2,
        ADDR.parse().unwrap(),
        Path::new(BPFFS),
        Path::new(RUNTIME_DIR),
    )
}

/// The installed example's Python worker (socket activation only), with the image's
/// interpreter.
fn python_config() -> ServiceConfig {
    config(vec![
        "/usr/bin/python3".into(),
        "/usr/share/doc/udp-supervisor/examples/echo_worker.py".into(),
    ])
}

/// The workspace's Rust echo worker (the container sees the workspace at its path).
fn echo_config() -> ServiceConfig {
    config(vec![bin_path("echo-worker").display().to_string()])
}

fn systemctl_ok(ct: &SystemdContainer, args: &[&str]) {
    let out = ct.systemctl(args);
    assert!(
        out.status.success(),
        "systemctl {args:?} failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ct.journal(Some(UNIT))
    );
}

/// `/usr/bin/supervisor status --json` inside: the installed binary.
fn status(ct: &SystemdContainer) -> Value {
    let out = ct.output(ct.command("/usr/bin/supervisor").args([
        "status",
        "--json",
        "--config",
        CONFIG_PATH,
    ]));
    assert!(
        out.status.success(),
        "supervisor status: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ct.journal(Some(UNIT))
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn wait_until(ct: &SystemdContainer, what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            ct.journal(Some(UNIT))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the selector has sent `n` more datagrams to `generation`.
fn wait_served(ct: &SystemdContainer, generation: u32, n: u64) {
    let base = selected_total(&status(ct), generation);
    wait_until(
        ct,
        &format!("{n} datagrams for generation {generation}"),
        || selected_total(&status(ct), generation) >= base + n,
    );
}

fn assert_lossless(report: &Report) {
    assert!(report.sent > 0, "nothing sent");
    assert_eq!(report.lost, 0, "lost datagrams\n{report}");
    assert_eq!(report.duplicated, 0, "duplicated datagrams\n{report}");
    assert_eq!(report.malformed, 0, "malformed replies\n{report}");
    assert_eq!(report.refused, 0, "refused sends\n{report}");
}

/// Files under `dir` inside the container (recursively), as host paths.
fn files_under(ct: &SystemdContainer, dir: &str) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
            out.push(e.path().display().to_string());
        }
    }
    let mut out = Vec::new();
    walk(&ct.host_path(dir), &mut out);
    out
}

#[test]
fn installed_package_starts_reloads_under_load_and_stops() {
    let started = Instant::now();
    let deb = build_package();
    let packed = started.elapsed();
    let ct = SystemdContainer::boot(&Rootfs::Host);
    let mut steps = vec![
        ("package".to_string(), packed),
        ("boot".to_string(), ct.boot_time()),
    ];
    let mut step = |name: &str, since: Instant| steps.push((name.to_string(), since.elapsed()));

    // Nothing of it there before (the overlay's lower layer is this machine's /).
    assert!(!ct.host_path("/usr/bin/supervisor").exists());
    let t = Instant::now();
    ct.sh(&format!("dpkg -i {}", deb.display()));
    step("dpkg -i", t);
    let version = ct.sh("dpkg-query -W -f='${Status} ${Version}' udp-supervisor");
    assert!(version.starts_with("install ok installed"), "{version}");

    // The files, where the tools look for them.
    let man = ct.sh("man -w supervisor");
    assert_eq!(man.trim(), "/usr/share/man/man1/supervisor.1.gz");
    let man = ct.sh("man -w supervisor-upgrade");
    assert_eq!(man.trim(), "/usr/share/man/man1/supervisor-upgrade.1.gz");
    for f in [
        "/usr/share/bash-completion/completions/supervisor",
        "/usr/share/zsh/vendor-completions/_supervisor",
        "/usr/share/fish/vendor_completions.d/supervisor.fish",
        "/usr/share/doc/udp-supervisor/README.md",
        "/usr/share/doc/udp-supervisor/docs/ARCHITECTURE.md",
        "/usr/share/doc/udp-supervisor/examples/echo.toml",
    ] {
        assert!(ct.host_path(f).is_file(), "{f} not installed");
    }
    // The bash completion completes the subcommands.
    let completion = ct.sh(
        "bash -c '. /usr/share/bash-completion/completions/supervisor; \
         COMP_WORDS=(supervisor up); COMP_CWORD=1; COMP_LINE=\"supervisor up\"; \
         COMP_POINT=${#COMP_LINE}; _supervisor supervisor up supervisor; \
         echo \"${COMPREPLY[@]}\"'",
    );
    assert_eq!(
        completion.trim(),
        "upgrade",
        "bash completion of `supervisor up`"
    );
    let help = ct.sh("/usr/bin/supervisor --version");
    assert!(help.starts_with("supervisor "), "{help}");
    for unit in [
        "udp-supervisor@.service",
        "udp-supervisor-notify-reload@.service",
    ] {
        let text = std::fs::read_to_string(ct.host_path(format!("/lib/systemd/system/{unit}")))
            .unwrap_or_else(|e| panic!("{unit} not installed: {e}"));
        assert!(
            text.contains("ExecStart=/usr/bin/supervisor run --config /etc/supervisor/%i.toml"),
            "{unit}: {text}"
        );
        assert!(!text.contains("/usr/local"), "{unit} names /usr/local");
        // The example's comments came along.
        assert!(text.contains("# Stopping: SIGTERM goes to the supervisor only."));
    }

    // The service from the installed unit and binary.
    ct.write_file(CONFIG_PATH, echo_config().to_toml());
    systemctl_ok(&ct, &["daemon-reload"]);
    let t = Instant::now();
    systemctl_ok(&ct, &["start", UNIT]);
    step("systemctl start", t);
    assert_eq!(
        ct.show(UNIT, "FragmentPath"),
        "/lib/systemd/system/udp-supervisor@.service"
    );
    let main_pid = ct.show(UNIT, "MainPID");
    let exe = ct.sh(&format!("readlink /proc/{main_pid}/exe"));
    assert_eq!(exe.trim(), "/usr/bin/supervisor");
    let first = status(&ct);
    assert_eq!(
        serving_generation(&first).and_then(|g| g["generation"].as_u64()),
        Some(1),
        "{first}"
    );

    // A reload under load to the installed example's Python worker: nothing lost.
    let load = BackgroundLoad::start_in(
        ct.netns_path(),
        LoadConfig::new(ADDR.parse().unwrap())
            .senders(4)
            .rate(5_000)
            .grace(Duration::from_secs(5)),
    );
    wait_served(&ct, 1, 500);
    ct.write_file(CONFIG_PATH, python_config().to_toml());
    let t = Instant::now();
    systemctl_ok(&ct, &["reload", UNIT]);
    step("systemctl reload", t);
    wait_served(&ct, 2, 500);
    wait_until(&ct, "generation 2 alone", || {
        generation_numbers(&status(&ct)) == vec![2]
    });
    let report = load.finish();
    eprintln!("package_deb: reload under 5000/s: {report}");
    assert_lossless(&report);
    assert_eq!(
        report.per_generation.keys().copied().collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        ct.show(UNIT, "MainPID"),
        main_pid,
        "the supervisor was restarted"
    );

    // Stop: no process, no pin, no control socket.
    let t = Instant::now();
    systemctl_ok(&ct, &["stop", UNIT]);
    step("systemctl stop", t);
    assert_eq!(ct.show(UNIT, "ActiveState"), "inactive");
    let procs: Vec<_> = ct
        .processes()
        .into_iter()
        .filter(|(_, c)| {
            c.contains("supervisor run") || c.contains("echo-worker") || c.contains("echo_worker")
        })
        .collect();
    assert!(procs.is_empty(), "processes left after stop: {procs:?}");
    let pins = files_under(&ct, BPFFS);
    assert!(pins.is_empty(), "pins left after stop: {pins:?}");
    assert!(!ct.host_path(format!("{RUNTIME_DIR}/echo.sock")).exists());

    // Removal takes every packaged file with it.
    let t = Instant::now();
    ct.sh("dpkg -r udp-supervisor");
    step("dpkg -r", t);
    for f in [
        "/usr/bin/supervisor",
        "/lib/systemd/system/udp-supervisor@.service",
        "/usr/share/man/man1/supervisor.1.gz",
        "/usr/share/bash-completion/completions/supervisor",
    ] {
        assert!(!ct.host_path(f).exists(), "{f} left after dpkg -r");
    }

    let halt = ct.shutdown();
    steps.push(("halt".into(), halt));
    let steps: Vec<String> = steps
        .iter()
        .map(|(s, d)| format!("{s} {:.0} ms", d.as_secs_f64() * 1000.0))
        .collect();
    eprintln!("package_deb: {}", steps.join(", "));
}
