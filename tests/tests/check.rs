//! `supervisor check --config F` (issue 16): refuses what `supervisor run` refuses
//! before it changes anything, with the same exit code and the same `error:` line,
//! and changes nothing itself: no directory, mount, pin, socket or lock file.
//!
//! The cases are the config and host refusals of `bad_input.rs` and `hardening.rs`
//! (restated here: those files keep their own worlds and extra assertions). Each
//! case runs `check`, then `run`, on the same file in the same world.

#![deny(unsafe_code)]

use std::fs;
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use supervisor_tests::World;
use supervisor_tests::hostile::{NOBODY, UnmountOnDrop, is_mount_point, reuseport_socket};
use supervisor_tests::supervisor::single_error_line;
use supervisor_tests::world::{RUN_TIMEOUT, WORLD_ADDR as ADDR};
use supervisor_tests::{ServiceConfig, TempDir};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What this file asks of its world beyond the harness.
trait CheckAndRun {
    fn both_refuse(&self, case: &str, wrapper: &[&str], config: &Path) -> (String, String);

    fn same_refusal(&self, case: &str, wrapper: &[&str], config: &Path) -> String;

    fn same_refusal_of(&self, case: &str, config: &ServiceConfig) -> String;
}

impl CheckAndRun for World {
    fn both_refuse(&self, case: &str, wrapper: &[&str], config: &Path) -> (String, String) {
        let check = self.supervisor(wrapper, &["check"], config);
        let check_err = text(&check.stderr);
        assert_eq!(
            check.status.code(),
            Some(2),
            "{case}: check must refuse with 2\nstdout:\n{}\nstderr:\n{check_err}",
            text(&check.stdout)
        );
        assert!(
            check.stdout.is_empty(),
            "{case}: check printed on stdout: {}",
            text(&check.stdout)
        );
        let lines: Vec<&str> = check_err.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: "),
            "{case}: check must print exactly one `error:` line:\n{check_err}"
        );
        let run = self.supervisor(wrapper, &["run"], config);
        let run_err = text(&run.stderr);
        assert_eq!(
            run.status.code(),
            Some(2),
            "{case}: run must refuse with 2\nstderr:\n{run_err}"
        );
        let run_line = single_error_line(&run_err);
        println!("{case}:\n  check: {}\n  run:   {run_line}", lines[0]);
        (lines[0].to_string(), run_line)
    }

    fn same_refusal(&self, case: &str, wrapper: &[&str], config: &Path) -> String {
        let (check, run) = self.both_refuse(case, wrapper, config);
        assert_eq!(check, run, "{case}: check and run disagree");
        check
    }

    fn same_refusal_of(&self, case: &str, config: &ServiceConfig) -> String {
        let path = self.write_text("case.toml", &config.to_toml());
        self.same_refusal(case, &[], &path)
    }
}

fn without_caps(caps: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--inh-caps={caps}"),
        format!("--bounding-set={caps}"),
        "--".into(),
    ]
}

#[test]
fn check_refuses_what_run_refuses_with_the_same_line() {
    let w = World::new();
    let base = w.config().to_toml();

    // bad_input.rs
    let missing_file = w.work.path().join("does-not-exist.toml");
    w.same_refusal("missing config file", &[], &missing_file);
    let malformed = w.write_text("m.toml", &base.replacen("[[listen]]", "[[listen]", 1));
    w.same_refusal("malformed TOML", &[], &malformed);
    let unknown = w.write_text(
        "u.toml",
        &base.replacen("[service]\n", "[service]\nwrokers = 2\n", 1),
    );
    w.same_refusal("unknown key", &[], &unknown);
    let mut config = w.config();
    config.command = vec![w.work.path().join("no-such-worker").display().to_string()];
    w.same_refusal_of("missing command", &config);
    {
        let squatter = w.net.run_in(|| UdpSocket::bind(ADDR).expect("bind"));
        w.same_refusal_of("address bound without reuseport", &w.config());
        drop(squatter);
        let metrics = "127.0.0.1:9464";
        let squatter = w
            .net
            .run_in(|| std::net::TcpListener::bind(metrics).expect("bind"));
        let mut config = w.config();
        config.extra_toml = format!("[metrics]\nlisten = \"{metrics}\"");
        w.same_refusal_of("metrics port taken", &config);
        drop(squatter);
        let foreign = reuseport_socket(&w.net, ADDR.parse().unwrap());
        w.same_refusal_of("foreign reuseport socket", &w.config());
        drop(foreign);
    }
    {
        let not_bpffs = TempDir::new("sup-notbpf");
        let _unmount = UnmountOnDrop(not_bpffs.path().join("bpf"));
        let mut config = w.config();
        config.bpffs = not_bpffs.path().join("bpf");
        let path = w.write_text("nomount.toml", &config.to_toml());
        let wrapper = without_caps("-sys_admin");
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        w.same_refusal("bpffs that cannot be mounted", &wrapper, &path);
    }
    {
        // Only the kernel's own refusal text differs: run names the bpf() errno
        // of the selector load, check the missing capability.
        let path = w.write_text("nobpf.toml", &base);
        let wrapper = without_caps("-sys_admin,-bpf");
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let (check, run) = w.both_refuse("missing privileges for bpf", &wrapper, &path);
        for line in [&check, &run] {
            assert!(
                line.starts_with("error: missing privileges for bpf(): "),
                "{line}"
            );
        }
    }
    let mut user = w.config().service_key("user", "no-such-user-here");
    user.name = "echo".into();
    w.same_refusal_of("unknown user", &user);

    // hardening.rs
    {
        let dir = TempDir::new("sup-notbpf");
        fs::write(dir.path().join("precious"), "keep me").unwrap();
        let _unmount = UnmountOnDrop(dir.path().to_path_buf());
        let mut config = w.config();
        config.bpffs = dir.path().to_path_buf();
        w.same_refusal_of("bpffs over files", &config);
        assert!(!is_mount_point(dir.path()));
    }
    let mut config = w.config();
    config.name = "a".repeat(243);
    w.same_refusal_of("overlong service name", &config);
    let mut config = w.config();
    config.runtime_dir = w.runtime.path().join("r".repeat(100));
    w.same_refusal_of("runtime dir too long for the control socket", &config);
    assert!(!config.runtime_dir.exists());
    let mut config = w.config();
    config.runtime_dir = PathBuf::from("relative-run");
    w.same_refusal_of("relative runtime dir", &config);
    for (key, from, to) in [
        (
            "ready_timeout",
            "ready_timeout = \"10s\"",
            "ready_timeout = \"150000000000000d\"",
        ),
        (
            "drain_timeout",
            "drain_timeout = \"10s\"",
            "drain_timeout = \"150000000000000d\"",
        ),
        (
            "flow_idle",
            "[[listen]]\n",
            "[[listen]]\nflow_idle = \"150000000000000d\"\n",
        ),
    ] {
        let edited = base.replace(from, to);
        assert_ne!(edited, base);
        let path = w.write_text("durations.toml", &edited);
        w.same_refusal(&format!("absurd {key}"), &[], &path);
    }
    for (what, mode, owner) in [
        ("world-writable runtime dir", 0o777, 0),
        ("group-writable runtime dir", 0o775, 0),
        ("runtime dir of another user", 0o755, NOBODY),
    ] {
        let dir = TempDir::new("sup-rt-bad");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(owner), Some(owner)).unwrap();
        let mut config = w.config();
        config.runtime_dir = dir.path().to_path_buf();
        w.same_refusal_of(what, &config);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "{what}");
    }
    {
        // Below a directory another user owns: refused before anything is created.
        let parent = TempDir::new("sup-rt-parent");
        std::os::unix::fs::chown(parent.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        let mut config = w.config();
        config.runtime_dir = parent.path().join("run");
        w.same_refusal_of("runtime dir below another user's directory", &config);
        assert!(!config.runtime_dir.exists());
    }
    assert!(w.pins.entries().is_empty(), "pins: {:?}", w.pins.entries());
    assert!(w.net.cmdlines().is_empty());
}

/// What a check could change, as text: the mount table, the namespace's UDP
/// sockets, and what is in (and above) the runtime dir and the bpffs dir.
fn snapshot(w: &World, dirs: &[&Path]) -> String {
    // The other tests of this binary run in parallel and mount their own network
    // namespaces under /run/netns meanwhile: those mounts are not this check's
    // doing (they made this test fail now and then), this test's own one stays in.
    let own_netns = format!(" /run/netns/{} ", w.net.name());
    let mut out: String = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| !line.contains(" /run/netns/sup-") || line.contains(&own_netns))
        .map(|line| format!("{line}\n"))
        .collect();
    for table in ["udp", "udp6", "unix"] {
        out += &w.net.run_in(|| {
            fs::read_to_string(format!("/proc/thread-self/net/{table}")).unwrap_or_default()
        });
    }
    for dir in dirs {
        out += &format!("{}: exists {}\n", dir.display(), dir.exists());
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            out += &format!("  {}\n", entry.path().display());
        }
    }
    out
}

#[test]
fn check_of_a_good_config_changes_nothing() {
    let w = World::new();
    // The runtime dir is missing and bpffs would need a mount: run would create and
    // mount; check must do neither.
    let bpffs_parent = TempDir::new("sup-emptybpf");
    let _unmount = UnmountOnDrop(bpffs_parent.path().join("bpf"));
    let mut config = w.config();
    config.runtime_dir = w.runtime.path().join("new");
    config.bpffs = bpffs_parent.path().join("bpf");
    let path = w.write_text("good.toml", &config.to_toml());
    let dirs = [
        w.runtime.path(),
        config.runtime_dir.as_path(),
        bpffs_parent.path(),
        config.bpffs.as_path(),
        w.pins.path(),
    ];
    let before = snapshot(&w, &dirs);
    let out = w.supervisor(&[], &["check"], &path);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "check logged something");
    assert_eq!(
        text(&out.stdout),
        format!("config {}: ok (service echo, 1 listener)\n", path.display())
    );
    let after = snapshot(&w, &dirs);
    assert_eq!(before, after, "check changed the system");
    assert!(!config.runtime_dir.exists());
    assert!(!config.bpffs.exists());
    assert!(w.net.cmdlines().is_empty());

    // On the standard bpffs (the world's pins) and an existing runtime dir, too.
    let path = w.write_text("plain.toml", &w.config().to_toml());
    let before = snapshot(&w, &dirs);
    let out = w.supervisor(&[], &["check"], &path);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(before, snapshot(&w, &dirs), "check changed the system");
}

/// While the service runs, `run` would be refused (the service's lock is held),
/// and so is `check`, with the same line, told from /proc/locks without touching the
/// lock; the running service is not disturbed. The same service from another
/// runtime dir meets the pin directory's lock.
#[test]
fn check_while_the_service_runs_is_refused_as_run_is() {
    let w = World::new();
    let mut sup = supervisor_tests::Supervisor::start(&w.net, w.config());
    let before = sup.wait_settled(1, RUN_TIMEOUT);
    let path = w.write_text("live.toml", &w.config().to_toml());
    let line = w.same_refusal("service already running", &[], &path);
    assert!(line.contains("already running"), "{line}");
    let other_runtime = TempDir::new("sup-run2");
    let mut second = w.config();
    second.runtime_dir = other_runtime.path().to_path_buf();
    w.same_refusal_of("same service from another runtime dir", &second);
    assert_eq!(fs::read_dir(other_runtime.path()).unwrap().count(), 0);
    let after = sup.status_json();
    assert_eq!(
        supervisor_tests::supervisor::worker_pids(&before, 1),
        supervisor_tests::supervisor::worker_pids(&after, 1)
    );
    sup.stop();
    w.pins.assert_empty_after_stop();
}
