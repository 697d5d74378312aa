//! End-to-end harness for the supervisor.
//!
//! The tests run the real `supervisor` binary as root against the real kernel, each in its
//! own network namespace ([`TestNet`]) with its own bpffs pin directory ([`PinDir`]) and
//! runtime directory ([`TempDir`]), so tests can run in parallel and leave nothing behind.
//!
//! Everything here panics on setup failure instead of returning errors: a test that
//! cannot set up its environment must fail loudly, never skip silently.

#![deny(unsafe_code)]

pub mod bench;
pub mod crash;
pub mod echo;
pub mod hostile;
pub mod leaks;
pub mod loadgen;
pub mod netns;
pub mod packet;
pub mod pins;
pub mod plain;
pub mod pressure;
pub mod stateful;
pub mod supervisor;
// The only module allowed `unsafe`; each block there states its invariant.
#[allow(unsafe_code)]
mod sys;
pub mod systemd_container;
pub mod world;

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use echo::Trailer;
pub use loadgen::{BackgroundLoad, LoadConfig, Report};
pub use netns::{TestNet, Veth};
pub use pins::PinDir;
pub use plain::PlainReuseportGroup;
pub use supervisor::{Balance, ReadyMode, ServiceConfig, Supervisor};
pub use systemd_container::{Rootfs, SystemdContainer};
pub use world::World;

/// Panics unless the process runs as root. The tests need CAP_BPF / CAP_NET_ADMIN
/// (network namespaces, bpffs, SO_RCVBUFFORCE); they must fail, not skip, without them.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "these end-to-end tests must run as root (they create network namespaces, \
             pin eBPF objects and use SO_RCVBUFFORCE); run them as root, e.g. `sudo -E cargo test -p supervisor-tests`"
        );
    }
}

/// A name fragment unique across tests in this process and, with high probability,
/// across concurrently running test processes: `<pid>-<counter>-<random>`.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}-{:08x}", std::process::id(), n, random_u32())
}

/// 32 random bits from the kernel; names must not collide with leftovers of a crashed run.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    u32::from_ne_bytes(b)
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a workspace binary (`supervisor`, `echo-worker`, `loadgen`).
///
/// Test executables live in `target/<profile>/deps/`; the binaries they drive live in
/// `target/<profile>/`. `cargo test -p supervisor-tests` does not build other packages'
/// binaries (cargo has no stable artifact dependencies), so a missing one is a setup
/// error with a clear fix. `SUPERVISOR_BIN_DIR` overrides the directory (e.g. for a
/// release build or an installed copy).
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("SUPERVISOR_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let mut dir = exe.parent().expect("exe has a dir").to_path_buf();
            if dir.file_name() == Some(OsStr::new("deps")) {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
             (or `cargo build --bins` while the eBPF member does not build for the host; \
             or set SUPERVISOR_BIN_DIR)",
            path.display()
        );
    }
    path
}

/// The test-only supervisor build whose selector and XDP filter programs differ
/// harmlessly from the real ones (feature `selector-variant`), built by
/// scripts/test.sh (and, in release, by scripts/bench.sh).
pub fn selector_variant_path() -> PathBuf {
    let path = bin_path("supervisor").with_file_name("supervisor-selector-variant");
    assert!(
        path.is_file(),
        "{} not found: build it as scripts/test.sh does (cargo build -p supervisor --bin supervisor --features selector-variant, copied to that name, then cargo build --bins)",
        path.display()
    );
    path
}

/// The python socket-activation example worker.
pub fn python_worker_path() -> PathBuf {
    let p = workspace_root().join("examples/python-worker/echo_worker.py");
    if !p.is_file() {
        panic!("python worker not found at {}", p.display());
    }
    p
}

/// The python example worker that binds its own sockets (`handoff = "bind"`).
pub fn self_binding_worker_path() -> PathBuf {
    let p = workspace_root().join("examples/python-worker/self_binding_worker.py");
    if !p.is_file() {
        panic!("python worker not found at {}", p.display());
    }
    p
}

/// Absolute path of the real python3 interpreter.
///
/// `python3` on PATH may be a wrapper (pyenv shims are shell scripts that need the
/// caller's environment); asking the interpreter for `sys.executable` gives a path the
/// supervisor can exec directly from its argv without a shell or PATH lookup.
pub fn python3_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 must be installed for the socket-activation example");
        assert!(out.status.success(), "python3 failed: {out:?}");
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            p.is_absolute(),
            "python3 reported a non-absolute sys.executable: {p:?}"
        );
        p
    })
    .clone()
}

/// A directory under /tmp removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/<prefix>-<unique>`, mode 0755 as the supervisor makes its own
    /// runtime directory: writable by root alone (the control socket lives here),
    /// searchable by a worker running as `service.user` (so is its notify socket).
    pub fn new(prefix: &str) -> TempDir {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("{prefix}-{}", unique_suffix()));
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Runs `cmd` to completion with stdout/stderr captured, killing it (and failing) after
/// `timeout`, so a hung CLI call cannot hang the test suite.
///
/// Output goes through files rather than pipes so nothing blocks on a full pipe while we
/// poll for exit.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let dir = TempDir::new("sup-out");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("create stdout file"))
        .stderr(fs::File::create(&err_path).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            kill_group_or_pid(&mut child);
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                fs::read_to_string(&out_path).unwrap_or_default(),
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
    };
    Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    }
}

/// Polls `child` until it exits or `timeout` passes; `None` on timeout (child still runs).
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("wait for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs the child's process group when it leads one (children spawned through
/// [`TestNet::exec`] do), else just the child.
fn kill_group_or_pid(child: &mut Child) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::{Pid, getpgid};
    let pid = Pid::from_raw(child.id() as i32);
    if getpgid(Some(pid)).ok() == Some(pid) {
        let _ = killpg(pid, Signal::SIGKILL);
    } else {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// Formats a duration the way the config's duration fields are written (`10s`, `1500ms`).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis().max(1))
    }
}

/// Formats a byte size the way the config's size fields are written (`4MiB`, `512KiB`).
/// Sizes are rounded up to whole KiB because that is the unit the contract shows.
pub fn format_size(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{}MiB", bytes / MIB)
    } else {
        format!("{}KiB", bytes.div_ceil(KIB))
    }
}
