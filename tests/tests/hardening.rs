//! Issue 12, hardening: what a careless operator or another local user could do to a
//! supervisor, each reproduced against the real binary in its own network namespace,
//! pin directory and runtime directory.
//!
//! Bad input is refused with exit code 2 and one line starting with `error:` that
//! names what is wrong and where (the file and the key), and it changes nothing: no
//! pin, mount, socket, process or lock file is left behind.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use supervisor_tests::World;
use supervisor_tests::hostile::{
    FakeDaemon, NOBODY, UnmountOnDrop, is_mount_point, nobody_with_dac_override, reuseport_socket,
};
use supervisor_tests::supervisor::{
    generation_numbers, selected_total, single_error_line, supervisor_command, worker_pids,
};
use supervisor_tests::world::{RUN_TIMEOUT, WORLD_ADDR as ADDR};
use supervisor_tests::{
    LoadConfig, PinDir, ReadyMode, ServiceConfig, Supervisor, TempDir, TestNet, bin_path, loadgen,
    output_with_timeout, require_root, wait_timeout,
};

const SETTLE: Duration = Duration::from_secs(30);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What this file asks of its world beyond the harness.
trait Hardening {
    fn write(&self, file: &str, config: &ServiceConfig) -> PathBuf;

    fn refused_run(&self, config: &Path, service: &str, runtime_dir: &Path) -> String;

    fn config_error(&self, config: &Path, service: &str) -> String;

    fn traffic(&self, count: u64);
}

impl Hardening for World {
    fn write(&self, file: &str, config: &ServiceConfig) -> PathBuf {
        self.write_text(file, &config.to_toml())
    }

    fn refused_run(&self, config: &Path, service: &str, runtime_dir: &Path) -> String {
        let out = self.supervisor(&[], &["run"], config);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "must be refused with exit code 2\nconfig {}:\n{}\nstdout:\n{}\nstderr:\n{stderr}",
            config.display(),
            fs::read_to_string(config).unwrap_or_else(|e| format!("({e})")),
            text(&out.stdout)
        );
        for file in [format!("{service}.sock"), format!("{service}.lock")] {
            let path = runtime_dir.join(&file);
            assert!(
                fs::symlink_metadata(&path).is_err(),
                "{} left behind by a refused start",
                path.display()
            );
        }
        let line = single_error_line(&stderr);
        println!("{line}");
        line
    }

    fn config_error(&self, config: &Path, service: &str) -> String {
        let out = self.supervisor(&[], &["run"], config);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "bad config must be refused with exit code 2\nconfig:\n{}\nstdout:\n{}\nstderr:\n{stderr}",
            fs::read_to_string(config).unwrap_or_default(),
            text(&out.stdout)
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: "),
            "a bad config must print exactly one `error:` line and nothing else (no log \
             lines before it):\n{stderr}"
        );
        assert!(
            lines[0].contains(&config.display().to_string()),
            "the error must name the file: {}",
            lines[0]
        );
        self.assert_nothing_left(service);
        println!("{}", lines[0]);
        lines[0].to_string()
    }

    fn traffic(&self, count: u64) {
        let report = self
            .net
            .run_in(|| loadgen::run(&LoadConfig::new(World::addr()).count(count).rate(2_000)))
            .expect("load generator");
        report.assert_all_answered_once();
    }
}

fn assert_mentions(line: &str, what: &[&str]) {
    for w in what {
        assert!(line.contains(w), "{w:?} not named in: {line}");
    }
}

/// The serving supervisor still has generation 1 with the same workers, and it
/// (not anyone else) answers new traffic.
fn assert_still_serving(world: &World, sup: &mut Supervisor<'_>, pids: &[i32]) {
    let status = sup.wait_settled(1, SETTLE);
    assert_eq!(worker_pids(&status, 1), pids, "{status}");
    let before = selected_total(&status, 1);
    world.traffic(200);
    let after = selected_total(&sup.status_json(), 1);
    assert!(
        after >= before + 200,
        "the first service's selector must still get its traffic: {before} -> {after}"
    );
}

// ---- item 2: two services on one address ----

#[test]
fn another_service_on_the_same_address_is_refused() {
    let w = World::new();
    let mut first = Supervisor::start(&w.net, w.config());
    let pids = worker_pids(&first.wait_settled(1, SETTLE), 1);
    let first_pid = first.pid().unwrap();

    // Another service (another name, runtime directory), same address.
    let other_runtime = TempDir::new("sup-run2");
    let mut other = ServiceConfig::new(
        "other",
        vec![bin_path("echo-worker").display().to_string()],
        1,
        World::addr(),
        &w.pins,
        other_runtime.path(),
    );
    other.listen_name = "other".into();
    let path = w.write("other.toml", &other);
    let line = w.refused_run(&path, "other", other_runtime.path());
    assert_mentions(&line, &[ADDR, "in use", &format!("pid {first_pid}")]);
    assert!(
        !w.pins.path().join("other").exists(),
        "the refused service left pins: {:?}",
        w.pins.entries()
    );

    assert_still_serving(&w, &mut first, &pids);
    first.stop();
    w.pins.assert_empty_after_stop();
}

#[test]
fn a_foreign_reuseport_socket_is_refused_at_start_and_at_upgrade() {
    let w = World::new();
    let me = format!("pid {}", std::process::id());

    // At start: a socket of this test process is in the address's group.
    let foreign = reuseport_socket(&w.net, World::addr());
    let path = w.write("echo.toml", &w.config());
    let line = w.refused_run(&path, "echo", w.runtime.path());
    assert_mentions(&line, &[ADDR, "in use", &me]);
    w.assert_nothing_left("echo");
    drop(foreign);

    // At upgrade: the socket joins the running service's group.
    let mut sup = Supervisor::start(&w.net, w.config());
    let pids = worker_pids(&sup.wait_settled(1, SETTLE), 1);
    let foreign = reuseport_socket(&w.net, World::addr());
    let out = sup.upgrade();
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an upgrade onto an address with a foreign socket must be refused\nstdout:\n{}\nstderr:\n{stderr}",
        text(&out.stdout)
    );
    assert_mentions(&single_error_line(&stderr), &[ADDR, "in use", &me]);
    assert_still_serving(&w, &mut sup, &pids);
    assert_eq!(generation_numbers(&sup.status_json()), vec![1]);

    drop(foreign);
    sup.upgrade_ok();
    sup.stop();
    w.pins.assert_empty_after_stop();
}

#[test]
fn restart_after_a_crash_is_not_refused_for_the_dead_supervisors_workers() {
    let w = World::new();
    // A worker that survives its supervisor: SIGTERM (the death signal) is ignored.
    let mut config = ServiceConfig::new(
        "echo",
        vec![
            "/bin/sh".into(),
            "-c".into(),
            "trap '' TERM; exec sleep 1000".into(),
        ],
        1,
        World::addr(),
        &w.pins,
        w.runtime.path(),
    )
    .ready(ReadyMode::Exec);
    config.drain_timeout = Some(Duration::from_secs(1));
    let mut crashed = Supervisor::start(&w.net, config.clone());
    let old = worker_pids(&crashed.wait_settled(1, SETTLE), 1);
    crashed.signal(Signal::SIGKILL);
    crashed.wait_exit(SETTLE);
    assert!(
        w.net.pids().contains(&old[0]),
        "test setup: the dead supervisor's worker {} must still hold its socket",
        old[0]
    );

    // Its workers outlive it by design: the restart takes them over and serves.
    let mut restarted = Supervisor::start(&w.net, config);
    restarted.wait_settled(1, SETTLE);
    restarted.stop();
    w.pins.assert_empty_after_stop();
}

// ---- item 3: bpffs mounted over anything ----

#[test]
fn bpffs_over_a_directory_with_files_is_refused() {
    let w = World::new();
    let dir = TempDir::new("sup-notbpf");
    let precious = dir.path().join("precious");
    fs::write(&precious, "keep me").unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    let mut config = w.config();
    config.bpffs = dir.path().to_path_buf();
    let path = w.write("bpffs.toml", &config);
    let line = w.config_error(&path, "echo");
    assert_mentions(&line, &["service.bpffs", &dir.path().display().to_string()]);
    assert!(
        !is_mount_point(dir.path()),
        "bpffs was mounted over the files"
    );
    assert_eq!(fs::read_to_string(&precious).unwrap(), "keep me");
}

#[test]
fn bpffs_is_mounted_on_an_empty_directory_and_unmounted_if_the_start_fails() {
    let w = World::new();
    let dir = TempDir::new("sup-emptybpf");
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());

    // The first generation fails (exit 1): the mount it made goes with it.
    let mut failing = w.config();
    failing.bpffs = dir.path().to_path_buf();
    failing.command = vec!["/bin/false".into()];
    let path = w.write("failing.toml", &failing);
    let out = w.supervisor(&[], &["run"], &path);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        !is_mount_point(dir.path()),
        "a failed start left bpffs mounted at {}",
        dir.path().display()
    );
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    w.assert_nothing_left("echo");

    // An empty directory is where nothing is: bpffs is mounted there and used.
    let mut config = w.config();
    config.bpffs = dir.path().to_path_buf();
    let mut sup = Supervisor::start(&w.net, config);
    sup.wait_settled(1, SETTLE);
    assert!(is_mount_point(dir.path()));
    assert!(
        dir.path()
            .join("echo")
            .join("echo")
            .join("selector")
            .exists()
    );
    sup.stop();
    // Every new bpffs holds the kernel's `bpf_preload` files; nothing else may stay.
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "maps.debug" && name != "progs.debug")
        .collect();
    assert!(left.is_empty(), "pins left in the mounted bpffs: {left:?}");
}

// ---- item 4: failed starts leave nothing ----

#[test]
fn an_overlong_service_name_is_a_config_error() {
    let w = World::new();
    let mut config = w.config();
    config.name = "a".repeat(243);
    let path = w.write("long-name.toml", &config);
    let line = w.config_error(&path, &config.name);
    assert_mentions(&line, &["service.name"]);
}

#[test]
fn a_runtime_dir_too_long_for_the_control_socket_is_a_config_error() {
    let w = World::new();
    let mut config = w.config();
    config.runtime_dir = w.runtime.path().join("r".repeat(100));
    let path = w.write("long-runtime.toml", &config);
    let line = w.config_error(&path, "echo");
    assert_mentions(&line, &["service.runtime_dir"]);
    assert!(!config.runtime_dir.exists(), "the runtime dir was created");
}

/// A notify socket file left in the runtime directory by a supervisor that died
/// (it is a path, `<runtime_dir>/<service>.notify`) does not stop the next start:
/// the stale socket is replaced, and the path is gone again after the stop.
#[test]
fn a_stale_notify_socket_does_not_stop_a_start() {
    let w = World::new();
    let path = w.runtime.path().join("echo.notify");
    let stale = std::os::unix::net::UnixDatagram::bind(&path).expect("a stale notify socket");
    drop(stale);
    assert!(fs::symlink_metadata(&path).is_ok());
    let mut sup = Supervisor::start(&w.net, w.config());
    sup.wait_settled(1, SETTLE);
    w.traffic(100);
    sup.stop();
    w.pins.assert_empty_after_stop();
    assert!(
        fs::symlink_metadata(&path).is_err(),
        "the notify socket is removed at stop"
    );
}

/// Whether `ifname` in `net` has an XDP program attached (per `ip link`).
fn has_xdp(net: &TestNet, ifname: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", net.name(), "-d", "link", "show", "dev", ifname])
        .output()
        .expect("ip link show");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).contains("prog/xdp")
}

#[test]
fn a_failed_start_removes_the_xdp_filter_it_attached_and_keeps_an_adopted_one() {
    require_root();
    let (server, _client) = TestNet::pair();
    let pins = PinDir::new();
    let runtime = TempDir::new("sup-run");
    let work = TempDir::new("sup-work");
    let ifname = server.veth().unwrap().ifname.clone();
    let mut good = ServiceConfig::echo(1, World::addr(), &pins, runtime.path());
    good.extra_toml = format!("[xdp]\ninterface = \"{ifname}\"\nmode = \"generic\"\n");
    let mut failing = good.clone();
    failing.command = vec!["/bin/false".into()];
    let failing_path = work.path().join("failing.toml");
    fs::write(&failing_path, failing.to_toml()).unwrap();
    let run_failing = |args: &[&str]| {
        let out = output_with_timeout(
            &mut supervisor_command(&server, &[], args, &failing_path),
            RUN_TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    };

    // Attached by this start: removed with everything else.
    run_failing(&["run"]);
    assert!(
        !has_xdp(&server, &ifname),
        "a failed start left its XDP filter attached"
    );
    pins.assert_empty_after_stop();

    // Adopted from a supervisor that died: kept (the interface stays filtered).
    // `--fresh`: a start that takes the dead one's generation over would not fail.
    let mut crashed = Supervisor::start(&server, good);
    crashed.wait_settled(1, SETTLE);
    crashed.signal(Signal::SIGKILL);
    crashed.wait_exit(SETTLE);
    assert!(has_xdp(&server, &ifname));
    run_failing(&["run", "--fresh"]);
    assert!(
        has_xdp(&server, &ifname),
        "a failed start removed the XDP filter it adopted"
    );
    let link = pins
        .path()
        .join("echo")
        .join("xdp")
        .join(&ifname)
        .join("link");
    assert!(link.exists(), "the adopted link pin must stay");
    // PinDir's drop removes the link pin, which detaches the filter.
}

// ---- item 5: durations ----

#[test]
fn absurd_durations_are_config_errors() {
    let w = World::new();
    let base = w.config().to_toml();
    for (key, edited) in [
        (
            "service.ready_timeout",
            base.replace(
                "ready_timeout = \"10s\"",
                "ready_timeout = \"150000000000000d\"",
            ),
        ),
        (
            "service.drain_timeout",
            base.replace(
                "drain_timeout = \"10s\"",
                "drain_timeout = \"150000000000000d\"",
            ),
        ),
        (
            "listen[0].flow_idle",
            base.replace(
                "[[listen]]\n",
                "[[listen]]\nflow_idle = \"150000000000000d\"\n",
            ),
        ),
    ] {
        assert_ne!(edited, base, "test setup: {key} not edited");
        let path = w.write_text("durations.toml", &edited);
        let line = w.config_error(&path, "echo");
        assert_mentions(&line, &[key]);
    }
}

#[test]
fn an_absurd_drain_timeout_is_refused_on_upgrade() {
    let w = World::new();
    let mut sup = Supervisor::start(&w.net, w.config());
    let pids = worker_pids(&sup.wait_settled(1, SETTLE), 1);
    let absurd = w.config().to_toml().replace(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"150000000000000d\"",
    );
    fs::write(sup.config_path(), absurd).unwrap();
    let out = sup.upgrade();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_mentions(&single_error_line(&stderr), &["service.drain_timeout"]);
    fs::write(sup.config_path(), w.config().to_toml()).unwrap();
    assert_still_serving(&w, &mut sup, &pids);
    sup.stop();
    w.pins.assert_empty_after_stop();
}

// ---- item 6: same name, other runtime directory ----

#[test]
fn the_same_service_from_another_runtime_dir_is_refused() {
    let w = World::new();
    let mut first = Supervisor::start(&w.net, w.config());
    let pids = worker_pids(&first.wait_settled(1, SETTLE), 1);
    let pins_before = w.pins.entries();

    let other_runtime = TempDir::new("sup-run2");
    let mut second = w.config();
    second.runtime_dir = other_runtime.path().to_path_buf();
    let path = w.write("second.toml", &second);
    let line = w.refused_run(&path, "echo", other_runtime.path());
    let pin_dir = w.pins.path().join("echo");
    assert_mentions(
        &line,
        &[
            &pin_dir.display().to_string(),
            &format!("pid {}", first.pid().unwrap()),
        ],
    );
    assert_eq!(
        w.pins.entries(),
        pins_before,
        "the first service's pins changed"
    );

    assert_still_serving(&w, &mut first, &pids);
    first.stop();
    w.pins.assert_empty_after_stop();
}

// ---- item 9: runtime directory trust ----

#[test]
fn a_runtime_dir_other_users_can_write_is_refused() {
    let w = World::new();
    for (what, mode, owner) in [
        ("world-writable", 0o777, 0),
        ("group-writable", 0o775, 0),
        ("owned by another user", 0o755, NOBODY),
    ] {
        let dir = TempDir::new("sup-rt-bad");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(owner), Some(owner)).unwrap();
        let mut config = w.config();
        config.runtime_dir = dir.path().to_path_buf();
        let path = w.write("runtime.toml", &config);
        let line = w.refused_run(&path, "echo", dir.path());
        assert_mentions(
            &line,
            &[
                "service.runtime_dir",
                &dir.path().display().to_string(),
                &path.display().to_string(),
            ],
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{what}: something was created in the refused runtime dir"
        );
        w.assert_nothing_left("echo");
    }
}

#[test]
fn a_missing_runtime_dir_is_created_writable_by_root_only() {
    let w = World::new();
    let mut config = w.config();
    config.runtime_dir = w.runtime.path().join("a").join("b");
    // Whatever umask the daemon inherits.
    let wrapper = ["/bin/sh", "-c", "umask 000; exec \"$@\"", "sh"];
    let mut sup = Supervisor::spawn_wrapped(&w.net, config.clone(), &wrapper);
    sup.wait_settled(1, SETTLE);
    for dir in [w.runtime.path().join("a"), config.runtime_dir.clone()] {
        let meta = fs::metadata(&dir).unwrap();
        assert_eq!(meta.uid(), 0, "{}", dir.display());
        assert_eq!(
            meta.mode() & 0o7777,
            0o755,
            "{} was created with mode {:o}",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    sup.stop();
}

#[test]
fn reexec_does_not_write_through_a_symlink_in_the_runtime_dir() {
    let w = World::new();
    let mut sup = Supervisor::start(&w.net, w.config());
    sup.wait_settled(1, SETTLE);
    let victim = w.work.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    symlink(&victim, w.runtime.path().join("echo.handoff.json")).unwrap();

    let out = output_with_timeout(&mut sup.cli(&["reexec"]), RUN_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "reexec\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(&victim).unwrap(),
        "precious",
        "the handoff was written through the symlink"
    );
    sup.wait_settled(1, SETTLE);
    sup.stop();
    w.pins.assert_empty_after_stop();
}

#[test]
fn the_cli_does_not_trust_a_control_socket_of_another_user() {
    let w = World::new();
    // A directory anyone may create files in, and a "daemon" of another user in it.
    let shared = TempDir::new("sup-rt-shared");
    fs::set_permissions(shared.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let socket = shared.path().join("echo.sock");
    let _fake = FakeDaemon::start(&socket, NOBODY, NOBODY);
    let mut config = w.config();
    config.runtime_dir = shared.path().to_path_buf();
    let path = w.write("shared.toml", &config);
    for args in [&["upgrade"][..], &["status"], &["stop"]] {
        let out = w.supervisor(&[], args, &path);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(
            out.status.code(),
            Some(2),
            "`{}` must not trust a socket of uid {NOBODY}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            args.join(" ")
        );
        assert!(!stdout.contains("succeeded"), "{stdout}");
        assert_mentions(
            &single_error_line(&stderr),
            &[&socket.display().to_string(), &format!("uid {NOBODY}")],
        );
    }
}

// ---- item 11: exit codes and messages ----

/// `status` from an answer it cannot read (a daemon of another version, say) is an
/// error (exit 1, one `error:` line), not a printout and exit 0 as it was (issue 9).
#[test]
fn a_status_answer_the_cli_cannot_read_is_an_error() {
    let w = World::new();
    let config = w.config();
    let path = w.write("echo.toml", &config);
    let _fake = FakeDaemon::answering(
        &config.control_socket(),
        0,
        0,
        "{\"event\":\"status\",\"status\":{\"service\":7}}\n",
    );
    for args in [&["status"][..], &["status", "--json"]] {
        let out = w.supervisor(&[], args, &path);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(
            out.status.code(),
            Some(1),
            "`{}` on an unreadable status\nstdout:\n{stdout}\nstderr:\n{stderr}",
            args.join(" ")
        );
        assert_mentions(&single_error_line(&stderr), &["malformed"]);
    }
}

#[test]
fn a_user_the_daemon_refuses_gets_a_clear_error() {
    let w = World::new();
    let mut sup = Supervisor::start(&w.net, w.config());
    let pids = worker_pids(&sup.wait_settled(1, SETTLE), 1);
    let wrapper = nobody_with_dac_override();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    for args in [&["status"][..], &["upgrade"], &["stop"]] {
        let out = w.supervisor(&wrapper, args, sup.config_path());
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "`{}` as uid {NOBODY}\nstdout:\n{}\nstderr:\n{stderr}",
            args.join(" "),
            text(&out.stdout)
        );
        assert_mentions(
            &single_error_line(&stderr),
            &["permission denied", &format!("uid {NOBODY}")],
        );
    }
    assert_still_serving(&w, &mut sup, &pids);
    sup.stop();
}

#[test]
fn a_daemon_lost_mid_upgrade_is_reported() {
    let w = World::new();
    let mut sup = Supervisor::start(&w.net, w.config());
    sup.wait_settled(1, SETTLE);
    let mut slow = w.config();
    slow.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("sleep 1000; exec {}", bin_path("echo-worker").display()),
    ];
    sup.set_config(slow);
    let out_dir = TempDir::new("sup-upgrade-out");
    let mut cmd = sup.cli(&["upgrade"]);
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(out_dir.path().join("stdout")).unwrap())
        .stderr(fs::File::create(out_dir.path().join("stderr")).unwrap());
    let mut upgrade = w.net.spawn(&mut cmd);
    sup.wait_status("the upgrade to be under way", SETTLE, |v| {
        v["upgrade_in_progress"] == true
    });
    sup.signal(Signal::SIGKILL);
    sup.wait_exit(SETTLE);
    let status = wait_timeout(&mut upgrade, SETTLE).expect("the upgrade CLI hangs");
    let stderr = fs::read_to_string(out_dir.path().join("stderr")).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        single_error_line(&stderr),
        "error: the supervisor went away before the upgrade finished; check supervisor status"
    );
}

#[test]
fn bad_configs_print_one_error_line_and_nothing_before_it() {
    let w = World::new();
    let full = TempDir::new("sup-full");
    fs::write(full.path().join("file"), "").unwrap();
    let _unmount = UnmountOnDrop(full.path().to_path_buf());
    let mut relative = w.config();
    relative.runtime_dir = PathBuf::from("relative-run");
    let mut bpffs_full = w.config();
    bpffs_full.bpffs = full.path().to_path_buf();
    let mut missing = w.config();
    missing.command = vec![w.work.path().join("no-such-worker").display().to_string()];
    for (key, config) in [
        ("service.runtime_dir", relative),
        ("service.bpffs", bpffs_full),
        ("service.command", missing),
    ] {
        let path = w.write("bad.toml", &config);
        let line = w.config_error(&path, "echo");
        assert_mentions(&line, &[key]);
    }
    assert!(
        !w.work.path().join("relative-run").exists(),
        "a relative runtime_dir was created"
    );
}

#[test]
fn status_text_shows_a_workers_last_exit() {
    let w = World::new();
    let mut sup = Supervisor::start(&w.net, w.config());
    let pids = worker_pids(&sup.wait_settled(1, SETTLE), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), Signal::SIGKILL).unwrap();
    let status = sup.wait_status("worker 0 restarted", SETTLE, |v| {
        v["generations"][0]["workers"][0]["restarts"].as_u64() >= Some(1)
            && v["generations"][0]["workers"][0]["last_exit"].is_string()
    });
    let last_exit = status["generations"][0]["workers"][0]["last_exit"]
        .as_str()
        .unwrap()
        .to_string();
    let out = output_with_timeout(&mut sup.cli(&["status"]), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    let worker0 = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("worker 0 "))
        .unwrap_or_else(|| panic!("no worker 0 line in:\n{stdout}"));
    assert!(
        worker0.contains(&last_exit),
        "the worker line must show its last exit ({last_exit:?}): {worker0}"
    );
    sup.stop();
}

#[test]
fn the_lock_file_is_removed_on_a_clean_stop() {
    let w = World::new();
    let mut sup = Supervisor::start(&w.net, w.config());
    sup.wait_settled(1, SETTLE);
    assert!(w.runtime.path().join("echo.lock").exists());
    sup.stop();
    let left: Vec<_> = fs::read_dir(w.runtime.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        left.is_empty(),
        "left in the runtime dir after a stop: {left:?}"
    );
    w.pins.assert_empty_after_stop();
}
