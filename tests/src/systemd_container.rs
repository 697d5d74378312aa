//! A real systemd as PID 1 of a `systemd-nspawn` container, for tests that run the
//! project's unit files the way users do (`systemctl start`, `reload`, `stop`).
//!
//! This machine kind has no systemd as PID 1 and no systemd bus, but nspawn boots one
//! here: the container's root is a read-only root filesystem under a tmpfs overlay (the
//! host's own `/`, which boots the host's systemd with nothing to download, or the cached
//! rootfs with a newer systemd that `scripts/systemd-rootfs.sh` builds), it has a private
//! network (only `lo`), all capabilities, and `bpf()` allowed. Boot takes about half a
//! second; everything a test writes lands in the tmpfs and goes with the container.
//!
//! Each container is unique to its test: its own state directory (`/tmp/sdcont-<id>`),
//! cgroup (`sdcont-<id>` in every hierarchy, so nspawn's own `payload`/`supervisor`
//! cgroups can be removed), private mount namespace (the overlay and nspawn's
//! `/run/systemd/nspawn` exist only there), and machine name. [`SystemdContainer::shutdown`]
//! halts it cleanly and checks that none of that is left; drop does the same without the
//! checks (a test that already failed must not panic twice).
//!
//! Commands run inside with `nsenter -t <pid1> -a` (all namespaces, the container's root):
//! they keep the caller's capabilities and have no seccomp filter, unlike the units.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{TempDir, output_with_timeout, require_root, wait_timeout, workspace_root};

/// Where `scripts/systemd-rootfs.sh` keeps the rootfs with a newer systemd; overridden by
/// `$UDP_SUPERVISOR_CACHE`, as in the script.
pub const DEFAULT_CACHE: &str = "/var/cache/udp-supervisor";

/// Upper bound for the boot to `running` (it takes about half a second here; a loaded
/// machine running two tests at once can be much slower).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for a clean halt after SIGTERM to nspawn (about two seconds here).
const HALT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one command run inside (systemctl waits for start/reload/stop jobs,
/// which the units bound with their own timeouts, all shorter than this).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// The root filesystem a container boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rootfs {
    /// This machine's own `/` (Debian 12: systemd 252).
    Host,
    /// `scripts/systemd-rootfs.sh`'s rootfs: the same release with systemd from backports
    /// (Debian 12: 254).
    Backports,
}

impl Rootfs {
    /// The directory used as the overlay's read-only lower layer. Panics (with the fix)
    /// when the backports rootfs has not been built: tests fail, never skip.
    pub fn lower_dir(&self) -> PathBuf {
        match self {
            Rootfs::Host => PathBuf::from("/"),
            Rootfs::Backports => {
                let cache = std::env::var_os("UDP_SUPERVISOR_CACHE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
                let dir = cache.join(format!("{}-systemd-backports", os_codename()));
                if !dir.join(".recipe").is_file() {
                    panic!(
                        "no rootfs with a newer systemd at {}: run `scripts/bootstrap.sh` \
                         (it runs scripts/systemd-rootfs.sh once, about two minutes)",
                        dir.display()
                    );
                }
                dir
            }
        }
    }
}

/// `VERSION_CODENAME` of this machine's /etc/os-release (`bookworm`).
fn os_codename() -> String {
    let text = fs::read_to_string("/etc/os-release").expect("read /etc/os-release");
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .expect("VERSION_CODENAME in /etc/os-release")
}

/// A booted container. See the module documentation.
pub struct SystemdContainer {
    /// `sdcont-<unique>`: the state directory's name, the cgroup and the machine name.
    name: String,
    state: Option<TempDir>,
    nspawn: Option<Child>,
    pid1: i32,
    boot_time: Duration,
    systemd_version: u32,
}

/// Runs in a private mount namespace (`unshare --mount`), then becomes nspawn.
/// $1 state dir, $2 lower dir, $3 machine name, $4 systemd-nspawn, $5 the cgroup
/// directories to join (colon-separated), $6.. nspawn's arguments.
const BOOT_SCRIPT: &str = r#"set -eu
S=$1; lower=$2; name=$3; nspawn=$4; cgroups=$5; shift 5
# nspawn puts its own cgroups (payload, supervisor) under the one it starts in: give it
# one of its own that shutdown can remove.
IFS=:
for cg in $cgroups; do echo $$ > "$cg/cgroup.procs"; done
unset IFS
# nspawn keeps locks and its propagation directory here; this host's /run is not a
# tmpfs, so give it one that goes away with this namespace.
mkdir -p /run/systemd/nspawn
mount -t tmpfs tmpfs /run/systemd/nspawn
mkdir -p "$S/ov"
mount -t tmpfs -o mode=755 ov "$S/ov"
mkdir "$S/ov/upper" "$S/ov/work" "$S/ov/root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$S/ov/upper,workdir=$S/ov/work" "$S/ov/root"
# Only what the tests start: whatever the lower layer enables (the host's services,
# timers) would just add noise and boot time.
rm -f "$S"/ov/root/etc/systemd/system/multi-user.target.wants/* \
      "$S"/ov/root/etc/systemd/system/timers.target.wants/*
tr -d - < /proc/sys/kernel/random/uuid > "$S/ov/root/etc/machine-id"
exec "$nspawn" -D "$S/ov/root" -M "$name" "$@"
"#;

impl SystemdContainer {
    /// Boots `rootfs` with the workspace (and the binaries' directory, if elsewhere) bound
    /// read-only at the same paths, waits until systemd reports `running` (or `degraded`),
    /// and mounts bpffs at /sys/fs/bpf inside. Panics with nspawn's output on failure.
    pub fn boot(rootfs: &Rootfs) -> SystemdContainer {
        require_root();
        let lower = rootfs.lower_dir();
        let nspawn = which("systemd-nspawn").unwrap_or_else(|| {
            panic!(
                "systemd-nspawn not found: run `scripts/bootstrap.sh` (it installs \
                 systemd-container pinned to the host's systemd version)"
            )
        });
        let started = Instant::now();
        let state = TempDir::new("sdcont");
        let name = state
            .path()
            .file_name()
            .expect("state dir has a name")
            .to_string_lossy()
            .into_owned();
        let cgroups = own_cgroups(&name);
        for cg in &cgroups {
            fs::create_dir_all(cg)
                .unwrap_or_else(|e| panic!("create cgroup {}: {e}", cg.display()));
        }
        let cgroups = std::env::join_paths(&cgroups).expect("cgroup paths without ':'");
        let mut binds = vec![workspace_root()];
        let bin_dir = crate::bin_path("supervisor")
            .parent()
            .expect("binaries have a directory")
            .to_path_buf();
        if !bin_dir.starts_with(&binds[0]) {
            binds.push(bin_dir);
        }
        let log = fs::File::create(state.path().join("nspawn.log")).expect("create nspawn.log");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            BOOT_SCRIPT,
            "sh",
        ])
        .arg(state.path())
        .arg(&lower)
        .arg(&name)
        .arg(&nspawn)
        .arg(&cgroups)
        // Boot the image's init as PID 1 in a new pid namespace.
        .arg("-b")
        // No systemd on the host to register with, nor a unit to move into.
        .args(["--register=no", "--keep-unit"])
        // The console is only read (into nspawn.log); there is no terminal.
        .arg("--console=read-only")
        // Only `lo`: listeners on fixed ports cannot collide between tests, and
        // nothing a test sends leaves the container.
        .arg("--private-network")
        // The supervisor loads eBPF programs and uses SO_RCVBUFFORCE; nspawn's
        // seccomp filter blocks bpf() and perf_event_open() even with every
        // capability, so allow them too.
        .arg("--capability=all")
        .arg("--system-call-filter=bpf perf_event_open");
        for b in &binds {
            cmd.arg(format!("--bind-ro={}", b.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn unshare/systemd-nspawn: {e}"));
        let mut container = SystemdContainer {
            name,
            state: Some(state),
            nspawn: Some(child),
            pid1: 0,
            boot_time: Duration::ZERO,
            systemd_version: 0,
        };
        container.wait_booted(started);
        container
    }

    fn wait_booted(&mut self, started: Instant) {
        let nspawn_pid = self.nspawn.as_ref().expect("running").id();
        let deadline = started + BOOT_TIMEOUT;
        loop {
            if let Some(status) = self
                .nspawn
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.nspawn = None;
                panic!(
                    "systemd-nspawn exited ({status}) before the container booted:\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "the container did not boot within {BOOT_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            // The container's PID 1 is nspawn's child whose command is systemd.
            let children =
                fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))
                    .unwrap_or_default();
            let pid1 = children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .find(|p| {
                    fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "systemd")
                });
            if let Some(pid1) = pid1 {
                self.pid1 = pid1;
                // Blocks until boot has finished (running or degraded); fails while the
                // manager is not answering yet.
                let mut cmd = self.command("systemctl");
                cmd.args(["is-system-running", "--wait"]);
                let out = output_with_timeout(&mut cmd, BOOT_TIMEOUT);
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if state == "running" || state == "degraded" {
                    if state == "degraded" {
                        eprintln!(
                            "container {}: booted degraded; failed units:\n{}",
                            self.name,
                            self.sh("systemctl --failed --no-legend --no-pager || true")
                        );
                    }
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // nspawn's /sys is a read-only tmpfs without fs/bpf; a systemd host has bpffs
        // there, which is what the unit (and the supervisor's default `bpffs`) expects.
        self.sh(
            "mountpoint -q /sys/fs/bpf || { [ -d /sys/fs/bpf ] || { mount -o remount,bind,rw /sys \
             && mkdir -p /sys/fs/bpf && mount -o remount,bind,ro /sys; }; mount -t bpf bpf /sys/fs/bpf; }",
        );
        self.boot_time = started.elapsed();
        let version = self.sh("systemctl --version");
        self.systemd_version = version
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected `systemctl --version`: {version}"));
    }

    /// The container's PID 1 as a host pid.
    pub fn pid1(&self) -> i32 {
        self.pid1
    }

    /// From spawning nspawn to a booted system with bpffs mounted.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The major version of the systemd running as PID 1 (252, 254, ...).
    pub fn systemd_version(&self) -> u32 {
        self.systemd_version
    }

    /// The container's network namespace, for [`crate::BackgroundLoad::start_in`] and
    /// [`crate::loadgen::run_in`].
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid1))
    }

    /// `path` (absolute, as seen inside) from the host, through PID 1's root.
    pub fn host_path(&self, path: impl AsRef<Path>) -> PathBuf {
        let p = path.as_ref();
        let rel = p.strip_prefix("/").unwrap_or(p);
        PathBuf::from(format!("/proc/{}/root", self.pid1)).join(rel)
    }

    /// Writes a file inside the container (parents created).
    pub fn write_file(&self, path: impl AsRef<Path>, contents: impl AsRef<[u8]>) {
        let host = self.host_path(&path);
        if let Some(dir) = host.parent() {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        fs::write(&host, contents)
            .unwrap_or_else(|e| panic!("write {} in the container: {e}", path.as_ref().display()));
    }

    /// A command that runs `program` inside (all the container's namespaces and its
    /// root), with a clean environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .arg("-t")
            .arg(self.pid1.to_string())
            .args(["-a", "--"])
            .arg(program);
        cmd
    }

    /// Runs `cmd` (from [`command`](Self::command)) to completion, bounded by
    /// [`COMMAND_TIMEOUT`].
    pub fn output(&self, cmd: &mut Command) -> Output {
        output_with_timeout(cmd, COMMAND_TIMEOUT)
    }

    /// `systemctl ARGS...` inside; the caller looks at the exit status.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.output(self.command("systemctl").arg("--no-pager").args(args))
    }

    /// A shell command inside that must succeed; returns its stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self.output(self.command("sh").args(["-c", script]));
        assert!(
            out.status.success(),
            "`{script}` in container {} failed ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One unit property (`systemctl show -p NAME --value`).
    pub fn show(&self, unit: &str, property: &str) -> String {
        let out = self.systemctl(&["show", "-p", property, "--value", unit]);
        assert!(out.status.success(), "systemctl show {unit}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The journal of this boot, for one unit (`None`: everything).
    pub fn journal(&self, unit: Option<&str>) -> String {
        let mut cmd = self.command("journalctl");
        cmd.args(["-b", "--no-pager", "-o", "short-monotonic"]);
        if let Some(u) = unit {
            cmd.args(["-u", u]);
        }
        String::from_utf8_lossy(&self.output(&mut cmd).stdout).into_owned()
    }

    /// Commands of the container's processes (host pids), from the host's /proc: those
    /// in PID 1's pid namespace.
    pub fn processes(&self) -> Vec<(i32, String)> {
        let ns = fs::read_link(format!("/proc/{}/ns/pid", self.pid1)).ok();
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir("/proc") else {
            return out;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if ns.is_some() && fs::read_link(format!("/proc/{pid}/ns/pid")).ok() == ns {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                out.push((pid, cmdline.trim().to_string()));
            }
        }
        out
    }

    /// nspawn's output (the container's console) so far.
    pub fn log(&self) -> String {
        self.state
            .as_ref()
            .map(|s| fs::read_to_string(s.path().join("nspawn.log")).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Halts the container (SIGTERM to nspawn: systemd stops every unit, then powers
    /// off), removes its cgroups and state directory, and panics if anything is left:
    /// a process, a cgroup directory, a mount naming it, the state directory.
    /// Returns how long the halt took.
    pub fn shutdown(mut self) -> Duration {
        let started = Instant::now();
        let left = self.teardown();
        assert!(
            left.is_empty(),
            "container {} left things behind: {left:#?}",
            self.name
        );
        started.elapsed()
    }

    /// Everything shutdown does; returns what could not be removed.
    fn teardown(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(mut child) = self.nspawn.take() {
            let pid = Pid::from_raw(child.id() as i32);
            // nspawn turns SIGTERM into a clean halt of the container.
            let _ = kill(pid, Signal::SIGTERM);
            if wait_timeout(&mut child, HALT_TIMEOUT).is_none() {
                left.push(format!(
                    "systemd-nspawn did not halt the container within {HALT_TIMEOUT:?}; killed"
                ));
                // Killing the container's PID 1 kills its whole pid namespace.
                if self.pid1 > 0 {
                    let _ = kill(Pid::from_raw(self.pid1), Signal::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // The cgroups empty as their processes are reaped; give that a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let remaining: Vec<PathBuf> = all_cgroup_hierarchies()
                .into_iter()
                .map(|h| h.join(&self.name))
                .filter(|d| d.exists())
                .collect();
            for dir in &remaining {
                remove_cgroup_tree(dir);
            }
            let still: Vec<PathBuf> = remaining.into_iter().filter(|d| d.exists()).collect();
            if still.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                left.extend(still.iter().map(|d| format!("cgroup {}", d.display())));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        left.extend(
            mountinfo
                .lines()
                .filter(|l| l.contains(&self.name))
                .map(|l| format!("mount {l}")),
        );
        if let Some(state) = self.state.take() {
            let path = state.path().to_path_buf();
            drop(state);
            if path.exists() {
                left.push(format!("state directory {}", path.display()));
            }
        }
        left
    }
}

impl Drop for SystemdContainer {
    /// Cleans up after a failed test (shutdown already did it otherwise); reports what
    /// is left on stderr rather than panicking during an unwind.
    fn drop(&mut self) {
        if self.nspawn.is_some() || self.state.is_some() {
            for l in self.teardown() {
                eprintln!("container {}: left behind: {l}", self.name);
            }
        }
    }
}

/// The cgroups a container named `name` runs in: `/sys/fs/cgroup/<name>` on a unified
/// (v2) host; on a v1 or hybrid host (this machine kind) the same name in the `unified`
/// and named `systemd` hierarchies, the ones nspawn and the container's systemd use.
fn own_cgroups(name: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.join(name)];
    }
    ["unified", "systemd"]
        .iter()
        .map(|h| root.join(h))
        .filter(|h| h.is_dir())
        .map(|h| h.join(name))
        .collect()
}

/// Every place a container's cgroup can be: `/sys/fs/cgroup` itself (v2) and every
/// hierarchy mounted under it (v1 controllers, the named `systemd` one, `unified`).
fn all_cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut out = vec![root.to_path_buf()];
    if let Ok(rd) = fs::read_dir(root) {
        out.extend(
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !p.is_symlink()),
        );
    }
    out
}

/// Removes a cgroup directory and its children, deepest first (cgroup directories are
/// removed with rmdir once empty of processes; their files go with them).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// `program` in this process' PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
