//! Bad input to `supervisor run` (and CLI calls without a daemon): one line starting
//! with `error:` that names what is wrong, exit code 2, and nothing left behind: no
//! pins, no control socket, no process in the namespace.

#![deny(unsafe_code)]

use std::fs;
use std::net::UdpSocket;
use std::path::Path;

use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use supervisor_tests::TempDir;
use supervisor_tests::World;
use supervisor_tests::supervisor::single_error_line;
use supervisor_tests::world::WORLD_ADDR as ADDR;

/// What this file asks of its world beyond the harness.
trait Refusals {
    fn refused_run(&self, wrapper: &[&str], config: &Path, service: &str) -> String;
}

impl Refusals for World {
    fn refused_run(&self, wrapper: &[&str], config: &Path, service: &str) -> String {
        let out = self.supervisor(wrapper, &["run"], config);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(2),
            "bad input must exit with 2\nconfig {}:\n{}\nstdout:\n{}\nstderr:\n{stderr}",
            config.display(),
            fs::read_to_string(config).unwrap_or_else(|e| format!("({e})")),
            String::from_utf8_lossy(&out.stdout)
        );
        self.assert_nothing_left(service);
        let line = single_error_line(&stderr);
        println!("{line}");
        line
    }
}

fn assert_mentions(line: &str, what: &[&str]) {
    for w in what {
        assert!(line.contains(w), "{w:?} not named in: {line}");
    }
}

#[test]
fn missing_config_file() {
    let w = World::new();
    let path = w.work.path().join("does-not-exist.toml");
    let line = w.refused_run(&[], &path, "echo");
    assert_mentions(&line, &[&path.display().to_string()]);
}

#[test]
fn malformed_toml_names_file_and_line() {
    let w = World::new();
    let text = w.config().to_toml();
    // Line of the broken table header, 1-based.
    let broken = text.replacen("[[listen]]", "[[listen]", 1);
    let line_no = broken
        .lines()
        .position(|l| l == "[[listen]")
        .expect("header in config")
        + 1;
    let path = w.write_text("malformed.toml", &broken);
    let line = w.refused_run(&[], &path, "echo");
    assert_mentions(&line, &[&format!("{}:{line_no}", path.display())]);
}

#[test]
fn unknown_key_is_named() {
    let w = World::new();
    let text = w
        .config()
        .to_toml()
        .replacen("[service]\n", "[service]\nwrokers = 2\n", 1);
    let path = w.write_text("unknown.toml", &text);
    let line = w.refused_run(&[], &path, "echo");
    assert_mentions(&line, &[&format!("{}:2", path.display()), "wrokers"]);
}

#[test]
fn address_bound_without_reuseport() {
    let w = World::new();
    // A plain socket (no SO_REUSEPORT) already holds the port in the namespace.
    let squatter = w
        .net
        .run_in(|| UdpSocket::bind(ADDR).expect("bind the squatter"));
    let path = w.write_text("taken.toml", &w.config().to_toml());
    let line = w.refused_run(&[], &path, "echo");
    assert_mentions(&line, &[ADDR, "in use"]);
    drop(squatter);
}

#[test]
fn command_that_does_not_exist() {
    let w = World::new();
    let mut config = w.config();
    let missing = w.work.path().join("no-such-worker");
    config.command = vec![missing.display().to_string(), "--flag".into()];
    let path = w.write_text("missing-command.toml", &config.to_toml());
    let line = w.refused_run(&[], &path, "echo");
    assert_mentions(&line, &[&missing.display().to_string()]);
}

/// Runs the daemon without CAP_SYS_ADMIN (and whatever else `caps` names), from the
/// bounding and inheritable sets, so root cannot regain it at exec.
fn without_caps(caps: &str) -> Vec<String> {
    assert!(
        Path::new("/usr/bin/setpriv").exists() || which("setpriv"),
        "setpriv (util-linux) is needed to drop capabilities"
    );
    vec![
        "setpriv".into(),
        format!("--inh-caps={caps}"),
        format!("--bounding-set={caps}"),
        "--".into(),
    ]
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

#[test]
fn bpffs_that_cannot_be_mounted() {
    let w = World::new();
    // Not on bpffs, not under /sys/fs/bpf: the supervisor must mount bpffs there, and
    // cannot without CAP_SYS_ADMIN.
    let not_bpffs = TempDir::new("sup-notbpf");
    let bpffs = not_bpffs.path().join("bpf");
    let mut config = w.config();
    config.bpffs = bpffs.clone();
    let path = w.write_text("no-mount.toml", &config.to_toml());
    let wrapper = without_caps("-sys_admin");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let line = w.refused_run(&wrapper, &path, "echo");
    assert_mentions(&line, &["bpffs", &bpffs.display().to_string()]);
    // Nothing mounted there and nothing pinned.
    if bpffs.exists() {
        let fs_type = statfs(&bpffs).expect("statfs").filesystem_type();
        assert_ne!(
            fs_type,
            BPF_FS_MAGIC,
            "bpffs was mounted at {}",
            bpffs.display()
        );
        let left: Vec<_> = fs::read_dir(&bpffs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", bpffs.display());
    }
}

#[test]
fn missing_privileges_for_bpf() {
    let w = World::new();
    // bpffs is mounted (PinDir made sure); only bpf() itself is refused.
    let path = w.write_text("no-bpf.toml", &w.config().to_toml());
    let wrapper = without_caps("-sys_admin,-bpf");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let line = w.refused_run(&wrapper, &path, "echo");
    assert_mentions(&line, &["privileges"]);
}

#[test]
fn cli_without_a_running_daemon() {
    let w = World::new();
    let path = w.write_text("idle.toml", &w.config().to_toml());
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["upgrade"],
        &["stop"],
    ] {
        let out = w.supervisor(&[], args, &path);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(2),
            "`supervisor {}` without a daemon must exit 2\nstdout:\n{}\nstderr:\n{stderr}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        let line = single_error_line(&stderr);
        let socket = w.runtime.path().join("echo.sock");
        assert_mentions(&line, &[&socket.display().to_string()]);
        assert!(
            line.contains("running") || line.contains("reach"),
            "the message must say the daemon is not running / unreachable: {line}"
        );
        w.assert_nothing_left("echo");
    }
}
