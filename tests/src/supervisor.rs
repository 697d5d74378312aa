//! Running the real `supervisor` binary inside a [`TestNet`].

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{
    PinDir, TempDir, TestNet, bin_path, format_duration, format_size, output_with_timeout,
    wait_timeout,
};

/// How long `Supervisor::start` waits for a serving generation.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one `status` / `stop` CLI call.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    Random,
    Hash,
    Flow,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Random => "random",
            Balance::Hash => "hash",
            Balance::Flow => "flow",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyMode {
    Notify,
    Exec,
    Probe,
}

impl ReadyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyMode::Notify => "notify",
            ReadyMode::Exec => "exec",
            ReadyMode::Probe => "probe",
        }
    }
}

/// Parameters of a one-listener service config. `None` fields are left out of the TOML,
/// so the supervisor's defaults apply.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub name: String,
    /// argv; the supervisor execs it without a shell.
    pub command: Vec<String>,
    pub workers: u32,
    /// The `[[listen]] name` (the LISTEN_FDNAMES entry); defaults to the service name.
    pub listen_name: String,
    pub address: SocketAddr,
    pub balance: Option<Balance>,
    pub sockets_per_worker: Option<u32>,
    /// Bytes, written as `NMiB` / `NKiB`.
    pub receive_buffer: Option<u64>,
    pub flow_idle: Option<Duration>,
    pub ready: Option<ReadyMode>,
    pub ready_timeout: Option<Duration>,
    pub drain_signal: Option<String>,
    pub drain_timeout: Option<Duration>,
    pub runtime_dir: PathBuf,
    pub bpffs: PathBuf,
    /// Raw TOML appended as is (e.g. an `[xdp]` table).
    pub extra_toml: String,
    /// More `[service]` keys, written as given (e.g. `user`, `no_new_privs`).
    pub service_extra: toml::Table,
}

impl ServiceConfig {
    /// A service with bounded timeouts (a broken supervisor must fail a test quickly, not
    /// hang it) and a receive buffer large enough that the tests' bursts measure the
    /// design rather than the default ~256-datagram buffer.
    pub fn new(
        name: &str,
        command: Vec<String>,
        workers: u32,
        address: SocketAddr,
        pins: &PinDir,
        runtime_dir: &Path,
    ) -> ServiceConfig {
        ServiceConfig::at(name, command, workers, address, pins.path(), runtime_dir)
    }

    /// [`ServiceConfig::new`] with a pin root given as a path (inside a container,
    /// say, where the test owns no [`PinDir`]).
    pub fn at(
        name: &str,
        command: Vec<String>,
        workers: u32,
        address: SocketAddr,
        bpffs: &Path,
        runtime_dir: &Path,
    ) -> ServiceConfig {
        ServiceConfig {
            name: name.to_string(),
            command,
            workers,
            listen_name: name.to_string(),
            address,
            balance: None,
            sockets_per_worker: None,
            receive_buffer: Some(4 << 20),
            flow_idle: None,
            ready: None,
            ready_timeout: Some(Duration::from_secs(10)),
            drain_signal: None,
            drain_timeout: Some(Duration::from_secs(10)),
            runtime_dir: runtime_dir.to_path_buf(),
            bpffs: bpffs.to_path_buf(),
            extra_toml: String::new(),
            service_extra: toml::Table::new(),
        }
    }

    /// The Rust echo worker (`examples/echo-worker`), service name "echo", ready by
    /// `READY=1` (the supervisor's default mode).
    pub fn echo(
        workers: u32,
        address: SocketAddr,
        pins: &PinDir,
        runtime_dir: &Path,
    ) -> ServiceConfig {
        let cmd = vec![bin_path("echo-worker").to_string_lossy().into_owned()];
        ServiceConfig::new("echo", cmd, workers, address, pins, runtime_dir)
    }

    pub fn balance(mut self, b: Balance) -> Self {
        self.balance = Some(b);
        self
    }
    pub fn ready(mut self, r: ReadyMode) -> Self {
        self.ready = Some(r);
        self
    }
    pub fn sockets_per_worker(mut self, n: u32) -> Self {
        self.sockets_per_worker = Some(n);
        self
    }
    /// Sets a `[service]` key the fields above do not cover.
    pub fn service_key(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.service_extra.insert(key.into(), value.into());
        self
    }

    /// Where the control socket will be (docs/control-protocol.md).
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join(format!("{}.sock", self.name))
    }

    pub fn to_toml(&self) -> String {
        use toml::{Table, Value as T};
        let mut service = Table::new();
        service.insert("name".into(), T::String(self.name.clone()));
        service.insert(
            "command".into(),
            T::Array(self.command.iter().cloned().map(T::String).collect()),
        );
        service.insert("workers".into(), T::Integer(self.workers.into()));
        if let Some(r) = self.ready {
            service.insert("ready".into(), T::String(r.as_str().into()));
        }
        if let Some(d) = self.ready_timeout {
            service.insert("ready_timeout".into(), T::String(format_duration(d)));
        }
        if let Some(s) = &self.drain_signal {
            service.insert("drain_signal".into(), T::String(s.clone()));
        }
        if let Some(d) = self.drain_timeout {
            service.insert("drain_timeout".into(), T::String(format_duration(d)));
        }
        service.insert(
            "runtime_dir".into(),
            T::String(self.runtime_dir.to_string_lossy().into_owned()),
        );
        service.insert(
            "bpffs".into(),
            T::String(self.bpffs.to_string_lossy().into_owned()),
        );
        service.extend(self.service_extra.clone());

        let mut listen = Table::new();
        listen.insert("name".into(), T::String(self.listen_name.clone()));
        listen.insert("address".into(), T::String(self.address.to_string()));
        if let Some(n) = self.sockets_per_worker {
            listen.insert("sockets_per_worker".into(), T::Integer(n.into()));
        }
        if let Some(b) = self.receive_buffer {
            listen.insert("receive_buffer".into(), T::String(format_size(b)));
        }
        if let Some(b) = self.balance {
            listen.insert("balance".into(), T::String(b.as_str().into()));
        }
        if let Some(d) = self.flow_idle {
            listen.insert("flow_idle".into(), T::String(format_duration(d)));
        }

        // Written table by table so `[service]` comes first, as in the documented example
        // (a serialized map would sort `listen` before `service`).
        let mut s = format!(
            "[service]\n{}\n[[listen]]\n{}",
            toml::to_string(&service).expect("serialize [service]"),
            toml::to_string(&listen).expect("serialize [[listen]]")
        );
        if !self.extra_toml.is_empty() {
            s.push('\n');
            s.push_str(&self.extra_toml);
            s.push('\n');
        }
        s
    }
}

/// A running `supervisor run --config F`, killed on drop if still running.
pub struct Supervisor<'n> {
    net: &'n TestNet,
    config: ServiceConfig,
    /// Holds the config file and the captured stdout/stderr.
    work: TempDir,
    config_path: PathBuf,
    child: Option<Child>,
}

impl<'n> Supervisor<'n> {
    /// Starts the daemon and waits (up to [`START_TIMEOUT`]) until a generation serves.
    pub fn start(net: &'n TestNet, config: ServiceConfig) -> Supervisor<'n> {
        let mut sup = Supervisor::spawn(net, config);
        sup.wait_serving(START_TIMEOUT);
        sup
    }

    /// Starts the daemon without waiting for it (for tests of failing starts).
    pub fn spawn(net: &'n TestNet, config: ServiceConfig) -> Supervisor<'n> {
        Supervisor::spawn_wrapped(net, config, &[])
    }

    /// Starts the daemon through `wrapper` (see [`Supervisor::spawn_wrapped`]) and
    /// waits until a generation serves. For a daemon started with something extra:
    /// open fds, resource limits.
    pub fn start_wrapped(
        net: &'n TestNet,
        config: ServiceConfig,
        wrapper: &[&str],
    ) -> Supervisor<'n> {
        let mut sup = Supervisor::spawn_wrapped(net, config, wrapper);
        sup.wait_serving(START_TIMEOUT);
        sup
    }

    /// [`Supervisor::spawn`] through `wrapper`: `WRAPPER... supervisor run --config F`
    /// (a shell that sets a umask, opens fds or lowers limits, say, and execs the
    /// rest of its arguments, so the daemon keeps the wrapper's pid).
    pub fn spawn_wrapped(
        net: &'n TestNet,
        config: ServiceConfig,
        wrapper: &[&str],
    ) -> Supervisor<'n> {
        let work = TempDir::new("sup-work");
        let config_path = work.path().join(format!("{}.toml", config.name));
        fs::write(&config_path, config.to_toml()).expect("write config");
        let child = spawn_daemon(net, wrapper, &["run"], &config_path, work.path());
        Supervisor {
            net,
            config,
            work,
            config_path,
            child: Some(child),
        }
    }

    /// SIGKILLs the daemon alone, as a crash would, and reaps it. Its workers run in
    /// process groups of their own and are left alone; the test's [`TestNet`] still
    /// kills whatever is left in the namespace when it is dropped.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("supervisor not running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("SIGKILL supervisor");
        let _ = child.wait();
    }

    /// After [`Supervisor::kill9`] (or an exit): `supervisor run ARGS --config F`
    /// again with the same config file (so the same runtime dir and pin dir), logging
    /// after the earlier runs, and waits (up to [`START_TIMEOUT`]) until `status`
    /// answers, i.e. the new daemon has adopted what it found. Returns that status.
    pub fn restart_same_config(&mut self, args: &[&str]) -> Value {
        self.respawn(args);
        self.wait_status("the restarted supervisor to answer", START_TIMEOUT, |_| {
            true
        })
    }

    /// [`Supervisor::restart_same_config`] without waiting.
    pub fn respawn(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "the supervisor still runs");
        let mut run = vec!["run"];
        run.extend_from_slice(args);
        self.child = Some(spawn_daemon(
            self.net,
            &[],
            &run,
            &self.config_path,
            self.work.path(),
        ));
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Rewrites the config file (the next `upgrade` re-reads it).
    pub fn set_config(&mut self, config: ServiceConfig) {
        fs::write(&self.config_path, config.to_toml()).expect("write config");
        self.config = config;
    }

    /// Waits (up to `timeout`) for the daemon to exit by itself, e.g. after a
    /// signal the test sent it; returns how it exited.
    /// The daemon's exit status if it has exited (it is reaped then), else `None`.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("supervisor already stopped");
        let status = child.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("supervisor already stopped");
        match wait_timeout(&mut child, timeout) {
            Some(status) => status,
            None => {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                panic!(
                    "supervisor did not exit within {timeout:?}\n{}",
                    self.logs_for_panic()
                );
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The daemon's captured stdout and stderr so far.
    pub fn logs(&self) -> (String, String) {
        let read = |n: &str| fs::read_to_string(self.work.path().join(n)).unwrap_or_default();
        (read("stdout"), read("stderr"))
    }

    fn logs_for_panic(&self) -> String {
        let (out, err) = self.logs();
        format!(
            "--- config {} ---\n{}\n--- supervisor stdout ---\n{out}\n--- supervisor stderr ---\n{err}",
            self.config_path.display(),
            fs::read_to_string(&self.config_path).unwrap_or_default()
        )
    }

    /// `supervisor ARGS... --config F`, run inside the namespace.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = self.net.exec(bin_path("supervisor"));
        cmd.args(args).arg("--config").arg(&self.config_path);
        clean_env(&mut cmd);
        cmd
    }

    /// `supervisor reexec --binary BINARY`; panics with its output unless it
    /// succeeded (the re-executed daemon has then adopted everything).
    pub fn reexec_into(&self, binary: &Path) {
        let output = self
            .cli(&["reexec", "--binary", &binary.to_string_lossy()])
            .output()
            .expect("run supervisor reexec");
        assert!(
            output.status.success(),
            "re-exec into {} failed: {}{}",
            binary.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `supervisor upgrade --wait drained --config F`: returns once the older
    /// generations are gone too, which is what most tests assert on (the phases,
    /// "drained" included, are on stdout). Returns its output whatever the exit
    /// code; the caller asserts. Bounded by the config's ready and drain timeouts
    /// plus slack.
    pub fn upgrade(&self) -> Output {
        self.upgrade_with(&["--wait", "drained"])
    }

    /// `supervisor upgrade --config F` as an operator runs it: it returns when the
    /// new generation serves, while older generations drain on their own.
    pub fn upgrade_at_flip(&self) -> Output {
        self.upgrade_with(&[])
    }

    fn upgrade_with(&self, flags: &[&str]) -> Output {
        let c = &self.config;
        let bound = c.ready_timeout.unwrap_or(Duration::from_secs(10))
            + c.drain_timeout.unwrap_or(Duration::from_secs(30))
            + Duration::from_secs(30);
        let mut args = vec!["upgrade"];
        args.extend_from_slice(flags);
        output_with_timeout(&mut self.cli(&args), bound)
    }

    /// `supervisor status --json`, parsed; `Err` with the reason when it fails.
    pub fn try_status_json(&self) -> Result<Value, String> {
        let out = output_with_timeout(&mut self.cli(&["status", "--json"]), CLI_TIMEOUT);
        if !out.status.success() {
            return Err(format!(
                "status exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "status --json printed invalid JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `supervisor status --json`, parsed; panics (with the daemon's logs) on failure.
    pub fn status_json(&self) -> Value {
        self.try_status_json()
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs_for_panic()))
    }

    /// Waits (up to `timeout`) until the selector has sent at least `n` datagrams to
    /// `generation`: proof that it serves traffic, counted rather than timed.
    pub fn wait_selected(&mut self, generation: u32, n: u64, timeout: Duration) -> Value {
        self.wait_status(
            &format!("{n} datagrams selected for generation {generation}"),
            timeout,
            |v| selected_total(v, generation) >= n,
        )
    }

    /// Polls `status --json` until `pred` holds, failing early if the daemon exits.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "supervisor exited ({status}) while waiting for {what}\n{}",
                    self.logs_for_panic()
                );
            }
            match self.try_status_json() {
                Ok(v) if pred(&v) => return v,
                Ok(v) => last = v.to_string(),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last status: {last}\n{}",
                    self.logs_for_panic()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until some generation is "serving"; returns the status.
    pub fn wait_serving(&mut self, timeout: Duration) -> Value {
        self.wait_status("a serving generation", timeout, |v| {
            serving_generation(v).is_some()
        })
    }

    /// Number of the serving generation (panics if none serves).
    pub fn serving_generation(&self) -> u32 {
        let status = self.status_json();
        let g = serving_generation(&status)
            .unwrap_or_else(|| panic!("no serving generation in status: {status}"));
        g["generation"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_else(|| panic!("generation number missing in {g}"))
    }

    /// `supervisor upgrade` that must succeed: exit 0 with the phases on stdout (at least
    /// "flipped" and "drained"). Returns stdout.
    pub fn upgrade_ok(&self) -> String {
        let out = self.upgrade();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "upgrade failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
            out.status,
            self.logs_for_panic()
        );
        for phase in ["flipped", "drained"] {
            assert!(
                stdout.contains(phase),
                "upgrade output does not mention {phase:?}:\n{stdout}"
            );
        }
        stdout
    }

    /// Sends `signal` to the daemon (not to its workers).
    pub fn signal(&self, signal: Signal) {
        let pid = self.pid().expect("supervisor not running");
        kill(Pid::from_raw(pid as i32), signal).expect("signal the supervisor");
    }

    /// Waits until generation `generation` is the only one, serves, every worker is
    /// ready with a pid, and no upgrade is in progress; returns that status.
    pub fn wait_settled(&mut self, generation: u32, timeout: Duration) -> Value {
        let workers = self.config.workers as usize;
        self.wait_status(
            &format!("generation {generation} alone, serving, {workers} workers ready"),
            timeout,
            |v| {
                let gens = v["generations"]
                    .as_array()
                    .map_or(&[][..], |g| g.as_slice());
                v["upgrade_in_progress"] == false
                    && gens.len() == 1
                    && gens[0]["generation"] == generation
                    && gens[0]["state"] == "serving"
                    && gens[0]["workers"].as_array().is_some_and(|w| {
                        w.len() == workers
                            && w.iter().all(|w| w["state"] == "ready" && w["pid"].is_i64())
                    })
            },
        )
    }

    /// SIGTERM (drain everything and exit), wait, and require exit code 0.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("supervisor already stopped");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM supervisor");
        let bound =
            self.config.drain_timeout.unwrap_or(Duration::from_secs(30)) + Duration::from_secs(15);
        let Some(status) = wait_timeout(&mut child, bound) else {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            panic!(
                "supervisor did not exit within {bound:?} of SIGTERM\n{}",
                self.logs_for_panic()
            );
        };
        assert_eq!(
            status.code(),
            Some(0),
            "supervisor exited with {status} after SIGTERM\n{}",
            self.logs_for_panic()
        );
        status
    }
}

impl Drop for Supervisor<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The daemon leads its own process group (TestNet::exec): take its workers
            // down with it. TestNet's drop catches any that left the group.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs_for_panic());
        }
    }
}

/// `[WRAPPER...] supervisor ARGS... --config CONFIG` spawned in `net` with its
/// stdout and stderr appended to `<logs>/stdout` and `<logs>/stderr`.
fn spawn_daemon(
    net: &TestNet,
    wrapper: &[&str],
    args: &[&str],
    config: &Path,
    logs: &Path,
) -> Child {
    let append = |name: &str| {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(name))
            .unwrap_or_else(|e| panic!("open {name} log: {e}"))
    };
    let mut cmd = supervisor_command(net, wrapper, args, config);
    cmd.stdin(Stdio::null())
        .stdout(append("stdout"))
        .stderr(append("stderr"));
    if std::env::var_os("RUST_LOG").is_none() {
        // Useful logs when a test fails; the files are only printed then.
        cmd.env("RUST_LOG", "info");
    }
    net.spawn(&mut cmd)
}

/// `[WRAPPER...] supervisor ARGS... --config CONFIG` inside `net`, with the runner's
/// notify and socket-activation variables removed: for starts that are expected to
/// fail, CLI calls without a [`Supervisor`], and runs under a wrapper such as `setpriv`.
pub fn supervisor_command(
    net: &TestNet,
    wrapper: &[&str],
    args: &[&str],
    config: &Path,
) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = net.exec(program);
            c.args(rest).arg(bin_path("supervisor"));
            c
        }
        None => net.exec(bin_path("supervisor")),
    };
    cmd.args(args).arg("--config").arg(config);
    clean_env(&mut cmd);
    cmd
}

/// Generation numbers listed in a status, in order.
pub fn generation_numbers(status: &Value) -> Vec<u32> {
    status["generations"]
        .as_array()
        .map(|gens| {
            gens.iter()
                .filter_map(|g| g["generation"].as_u64().map(|n| n as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the workers of generation `generation` (workers without a pid are skipped).
pub fn worker_pids(status: &Value, generation: u32) -> Vec<i32> {
    status["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["generation"] == generation)
        .flat_map(|g| g["workers"].as_array().into_iter().flatten())
        .filter_map(|w| w["pid"].as_i64().map(|p| p as i32))
        .collect()
}

/// The sockets (all listeners) of generation `generation` in a status.
pub fn sockets_of(status: &Value, generation: u32) -> Vec<&Value> {
    status["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["generation"] == generation)
        .flat_map(|g| g["listeners"].as_array().into_iter().flatten())
        .flat_map(|l| l["sockets"].as_array().into_iter().flatten())
        .collect()
}

/// Datagrams the selector sent to generation `generation` (sum of its sockets'
/// `selected` counters); 0 if it is not listed.
pub fn selected_total(status: &Value, generation: u32) -> u64 {
    sockets_of(status, generation)
        .iter()
        .filter_map(|s| s["selected"].as_u64())
        .sum()
}

/// The one `error: ...` line a refused command must print on stderr. Timestamped log lines (the daemon's tracing output)
/// are ignored; anything else besides the one error line fails, so a message that
/// spills over several lines is caught.
pub fn single_error_line(stderr: &str) -> String {
    try_single_error_line(stderr).unwrap_or_else(|e| panic!("{e}"))
}

/// [`single_error_line`] without the panic: `Err` says what is wrong with `stderr`.
pub fn try_single_error_line(stderr: &str) -> Result<String, String> {
    let text: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_log_line(l))
        .collect();
    let errors: Vec<&&str> = text.iter().filter(|l| l.starts_with("error:")).collect();
    if errors.len() == 1 && text.len() == 1 {
        Ok(errors[0].to_string())
    } else {
        Err(format!(
            "expected exactly one line starting with `error:` (and nothing else but log \
             lines) on stderr, got {} error lines and {} other lines:\n{stderr}",
            errors.len(),
            text.len() - errors.len()
        ))
    }
}

/// A line of `tracing_subscriber::fmt` output: `2025-01-02T03:04:05.678Z  INFO ...`,
/// possibly wrapped in ANSI colour codes.
fn is_log_line(line: &str) -> bool {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let b = plain.as_bytes();
    b.len() > 11
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
}

/// The first generation whose state is "serving", if any.
pub fn serving_generation(status: &Value) -> Option<&Value> {
    status["generations"]
        .as_array()?
        .iter()
        .find(|g| g["state"] == "serving")
}

/// The test runner's own socket-activation / notify variables must not leak into the
/// daemon (it would think it runs under systemd) or its CLI.
fn clean_env(cmd: &mut Command) {
    for v in [
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        cmd.env_remove(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_ignores_log_lines_only() {
        let err = "\u{1b}[2m2025-01-02T03:04:05.678901Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m mounting\n\
                   2025-01-02T03:04:05.678901Z ERROR oops\nerror: bad thing\n";
        assert_eq!(single_error_line(err), "error: bad thing");
        let two = "error: x: invalid table header\nexpected `.`\n";
        assert!(std::panic::catch_unwind(|| single_error_line(two)).is_err());
        assert!(std::panic::catch_unwind(|| single_error_line("")).is_err());
    }

    #[test]
    fn config_toml_has_the_documented_shape() {
        let c = ServiceConfig {
            name: "echo".into(),
            command: vec!["/bin/echo-worker".into(), "--verbose".into()],
            workers: 4,
            listen_name: "echo".into(),
            address: "127.0.0.1:5300".parse().unwrap(),
            balance: Some(Balance::Hash),
            sockets_per_worker: Some(2),
            receive_buffer: Some(4 << 20),
            flow_idle: Some(Duration::from_millis(1500)),
            ready: Some(ReadyMode::Exec),
            ready_timeout: Some(Duration::from_secs(10)),
            drain_signal: Some("SIGINT".into()),
            drain_timeout: Some(Duration::from_secs(30)),
            runtime_dir: "/tmp/rt".into(),
            bpffs: "/sys/fs/bpf/x".into(),
            extra_toml: "[xdp]\ninterface = \"veth-a\"".into(),
            service_extra: toml::Table::new(),
        }
        .service_key("user", "nobody")
        .service_key("no_new_privs", false);
        let text = c.to_toml();
        assert!(text.starts_with("[service]\n"), "{text}");
        let v: toml::Table = toml::from_str(&text).expect("valid TOML");
        let s = &v["service"];
        assert_eq!(s["command"][1].as_str(), Some("--verbose"));
        assert_eq!(s["workers"].as_integer(), Some(4));
        assert_eq!(s["ready"].as_str(), Some("exec"));
        assert_eq!(s["ready_timeout"].as_str(), Some("10s"));
        assert_eq!(s["drain_signal"].as_str(), Some("SIGINT"));
        assert_eq!(s["bpffs"].as_str(), Some("/sys/fs/bpf/x"));
        assert_eq!(s["user"].as_str(), Some("nobody"));
        assert_eq!(s["no_new_privs"].as_bool(), Some(false));
        let l = &v["listen"][0];
        assert_eq!(l["address"].as_str(), Some("127.0.0.1:5300"));
        assert_eq!(l["balance"].as_str(), Some("hash"));
        assert_eq!(l["sockets_per_worker"].as_integer(), Some(2));
        assert_eq!(l["receive_buffer"].as_str(), Some("4MiB"));
        assert_eq!(l["flow_idle"].as_str(), Some("1500ms"));
        assert_eq!(v["xdp"]["interface"].as_str(), Some("veth-a"));
        assert_eq!(c.control_socket(), PathBuf::from("/tmp/rt/echo.sock"));
    }
}
