//! The service configuration (TOML); every key is in `docs/config.md`.
//!
//! Parsing is strict: unknown keys are errors, and every error names the file and,
//! where toml can tell, the line and the key. Validation that needs more than one
//! key (a listener name used twice, more sockets than the selector holds) happens
//! in [`Config::validate`] so that `upgrade` can refuse a bad file before anything
//! changes.
use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};
use supervisor_common::{BalanceMode, MAX_SOCKETS};

use crate::error::InputError;

/// The longest `service.name` and `listen.name`: they name files, pins and the
/// notify socket, whose lengths are bounded by the kernel.
pub const MAX_NAME_LEN: usize = 64;

/// The longest socket path: `sun_path` holds 108 bytes including the final NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// `service.ready_timeout`: a worker is given at least a millisecond and at most
/// an hour to become ready.
pub const READY_TIMEOUT_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(3600));

/// `service.drain_timeout`: 0 (kill the old generation at once) up to a day.
pub const DRAIN_TIMEOUT_MAX: Duration = Duration::from_secs(24 * 3600);

/// `listen.flow_idle`: the selector measures idle time in 10 ms ticks; more than a
/// day would outlive any draining generation (`drain_timeout` is at most a day).
pub const FLOW_IDLE_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(24 * 3600));

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub service: ServiceConfig,
    #[serde(rename = "listen", default)]
    pub listeners: Vec<ListenerConfig>,
    /// The XDP filter at the interface (`crate::xdp`), if any.
    #[serde(default)]
    pub xdp: Option<crate::xdp::XdpConfig>,
    /// The Prometheus endpoint (`crate::metrics`), off without `[metrics]`.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// The file it was read from, for messages.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[metrics]`: where `GET /metrics` is served (docs/metrics.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `"127.0.0.1:9464"`, `"[::1]:9464"`: an IP address and a port, no host name.
    pub listen: String,
}

impl MetricsConfig {
    pub fn address(&self) -> Result<std::net::SocketAddr, String> {
        let address: std::net::SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "{:?} is not an address and port such as \"127.0.0.1:9464\" or \"[::1]:9464\"",
                self.listen
            )
        })?;
        if address.port() == 0 {
            return Err(format!(
                "{:?}: port 0 would pick a random port; name one",
                self.listen
            ));
        }
        Ok(address)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default = "defaults::workers")]
    pub workers: u32,
    #[serde(default)]
    pub user: Option<String>,
    /// Workers cannot gain privileges through exec: `PR_SET_NO_NEW_PRIVS`, and
    /// with `user` an empty capability bounding set (docs/config.md).
    #[serde(default = "defaults::no_new_privs")]
    pub no_new_privs: bool,
    #[serde(default)]
    pub ready: ReadyMode,
    #[serde(default = "defaults::ready_timeout", with = "duration")]
    pub ready_timeout: Duration,
    #[serde(default = "defaults::drain_signal", deserialize_with = "signal")]
    pub drain_signal: nix::sys::signal::Signal,
    #[serde(default = "defaults::drain_timeout", with = "duration")]
    pub drain_timeout: Duration,
    #[serde(default = "defaults::runtime_dir")]
    pub runtime_dir: PathBuf,
    #[serde(default = "defaults::bpffs")]
    pub bpffs: PathBuf,
    /// `ready = "probe"`: the datagram sent to each new worker's first socket of the
    /// first listener; any answer means ready. Text as is, or `hex:` and hex digits
    /// for a binary request (a DNS query, say).
    #[serde(
        default = "defaults::probe_payload",
        deserialize_with = "probe_payload"
    )]
    pub probe_payload: Vec<u8>,
    /// What an upgrade does when every generation slot is taken (one serving,
    /// the rest draining).
    #[serde(default)]
    pub on_no_free_slot: NoFreeSlot,
    /// How workers get their sockets: `LISTEN_FDS`, or by binding their own
    /// (intercepted, `crate::handoff`).
    #[serde(default)]
    pub handoff: Handoff,
}

/// `service.handoff`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Handoff {
    /// Socket activation: the sockets at fd 3.., `LISTEN_FDS`, `LISTEN_FDNAMES`.
    #[default]
    ListenFds,
    /// The worker binds its own UDP sockets; each `bind()` to a listener's
    /// address is answered with one of the generation's sockets (seccomp user
    /// notification).
    Bind,
}

/// `service.on_no_free_slot`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoFreeSlot {
    /// The oldest draining generation is retired at once: its remaining flows
    /// move to the working generation (counted), its workers drain what they
    /// already have. Deploys never wait.
    #[default]
    RetireOldest,
    /// The upgrade is refused (exit 2) until a draining generation is gone.
    Refuse,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyMode {
    /// The worker sends `READY=1` on `NOTIFY_SOCKET`.
    #[default]
    Notify,
    /// The worker is ready as soon as it has been exec'd.
    Exec,
    /// The worker is ready when it answers `probe_payload` sent to its first
    /// socket (the selector steers the probe there before the flip).
    Probe,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    #[serde(deserialize_with = "socket_addr")]
    pub address: SocketAddr,
    #[serde(default = "defaults::sockets_per_worker")]
    pub sockets_per_worker: u32,
    #[serde(default = "defaults::receive_buffer", deserialize_with = "byte_size")]
    pub receive_buffer: u64,
    #[serde(default, deserialize_with = "balance")]
    pub balance: Balance,
    /// `flow` mode: a flow idle this long goes to the working generation; a
    /// draining generation with affinity is done once idle this long.
    #[serde(default = "defaults::flow_idle", with = "duration")]
    pub flow_idle: Duration,
    /// `flow` mode: entries in the LRU flow table (least recently used evicted).
    #[serde(default = "defaults::flow_table_size")]
    pub flow_table_size: u32,
    /// `cookie` mode: offset of the 16-bit big-endian cookie in the UDP payload.
    #[serde(default)]
    pub cookie_offset: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance(pub BalanceMode);

impl Default for Balance {
    fn default() -> Self {
        Balance(BalanceMode::Random)
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            BalanceMode::Random => "random",
            BalanceMode::Hash => "hash",
            BalanceMode::Flow => "flow",
            BalanceMode::Cookie => "cookie",
        })
    }
}

mod defaults {
    use std::{path::PathBuf, time::Duration};

    pub fn workers() -> u32 {
        1
    }
    pub fn no_new_privs() -> bool {
        true
    }
    pub fn ready_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn drain_signal() -> nix::sys::signal::Signal {
        nix::sys::signal::Signal::SIGTERM
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn runtime_dir() -> PathBuf {
        PathBuf::from("/run/supervisor")
    }
    pub fn bpffs() -> PathBuf {
        PathBuf::from("/sys/fs/bpf/supervisor")
    }
    pub fn sockets_per_worker() -> u32 {
        1
    }
    pub fn receive_buffer() -> u64 {
        4 << 20
    }
    pub fn probe_payload() -> Vec<u8> {
        b"supervisor readiness probe".to_vec()
    }
    pub fn flow_idle() -> Duration {
        Duration::from_secs(30)
    }
    pub fn flow_table_size() -> u32 {
        supervisor_common::DEFAULT_FLOW_TABLE_SIZE
    }
}

/// Durations as humans write them: "10s", "500ms", "1m 30s".
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write e.g. \"10s\" or \"500ms\""
            ))
        })
    }
}

fn signal<'de, D: Deserializer<'de>>(d: D) -> Result<nix::sys::signal::Signal, D::Error> {
    let text = String::deserialize(d)?;
    let name = if text.starts_with("SIG") {
        text.clone()
    } else {
        format!("SIG{text}")
    };
    name.parse().map_err(|_| {
        de::Error::custom(format!(
            "unknown signal {text:?}; write e.g. \"SIGTERM\" or \"SIGUSR2\""
        ))
    })
}

fn probe_payload<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    let bytes = match text.strip_prefix("hex:") {
        None => text.into_bytes(),
        Some(hex) => {
            let digits: Vec<char> = hex.chars().filter(|c| !c.is_whitespace()).collect();
            // from_str_radix alone would also take a sign: "+1" is no hex byte.
            if let Some(bad) = digits.iter().find(|c| !c.is_ascii_hexdigit()) {
                return Err(de::Error::custom(format!(
                    "{bad:?} is not a hex digit in probe_payload"
                )));
            }
            if !digits.len().is_multiple_of(2) {
                return Err(de::Error::custom(
                    "hex probe_payload needs an even number of digits",
                ));
            }
            digits
                .chunks(2)
                .map(|pair| {
                    let pair: String = pair.iter().collect();
                    u8::from_str_radix(&pair, 16).map_err(|_| {
                        de::Error::custom(format!("{pair:?} is not a hex byte in probe_payload"))
                    })
                })
                .collect::<Result<_, _>>()?
        }
    };
    if bytes.is_empty() {
        return Err(de::Error::custom("probe_payload must not be empty"));
    }
    Ok(bytes)
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        de::Error::custom(format!(
            "invalid address {text:?}; write an IPv4 \"127.0.0.1:5300\" or IPv6 \"[::1]:5300\" address with a port"
        ))
    })
}

fn balance<'de, D: Deserializer<'de>>(d: D) -> Result<Balance, D::Error> {
    let text = String::deserialize(d)?;
    match text.as_str() {
        "random" => Ok(Balance(BalanceMode::Random)),
        "hash" => Ok(Balance(BalanceMode::Hash)),
        "flow" => Ok(Balance(BalanceMode::Flow)),
        "cookie" => Ok(Balance(BalanceMode::Cookie)),
        other => Err(de::Error::custom(format!(
            "unknown balance mode {other:?}; expected \"random\", \"hash\", \"flow\" or \"cookie\""
        ))),
    }
}

/// "must be between 1ms and 1h (not 150000000000000days)".
fn out_of_range(value: Duration, min: Duration, max: Duration) -> String {
    format!(
        "must be between {} and {} (not {})",
        humantime::format_duration(min),
        humantime::format_duration(max),
        humantime::format_duration(value)
    )
}

/// "4MiB", "512KiB", "8M", "65536": binary units (K/M/G and KiB/MiB/GiB both mean 1024-based).
///
/// Hand-written rather than a crate: twenty lines, and the crates that parse sizes
/// disagree on whether "MB" is 10^6 or 2^20; socket buffers are always 2^n-minded.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}; write e.g. \"4MiB\" or \"262144\""))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" | "k" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {text:?}; use KiB, MiB or GiB"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(n),
        Size::Text(text) => parse_byte_size(&text).map_err(de::Error::custom),
    }
}

impl Config {
    /// Reads and validates a config file. Every error names the file.
    pub fn load(path: &Path) -> Result<Config, InputError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            InputError::new(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, InputError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            // toml's message carries "line N, column M" and the offending key;
            // flatten it to one line so it reads well in a journal.
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            let location = e
                .span()
                .map(|span| {
                    let line = text[..span.start].matches('\n').count() + 1;
                    let key = text[span.clone()].lines().next().unwrap_or("").trim();
                    format!(":{line}: at `{key}`")
                })
                .unwrap_or_default();
            InputError::new(format!("{}{location}: {message}", path.display()))
        })?;
        config.path = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), InputError> {
        if let Some(xdp) = &self.xdp {
            xdp.validate(&self.path)?;
        }
        let bad = |key: &str, why: String| {
            Err(InputError::new(format!(
                "{}: {key}: {why}",
                self.path.display()
            )))
        };
        if let Some(metrics) = &self.metrics
            && let Err(why) = metrics.address()
        {
            return bad("metrics.listen", why);
        }
        let name = &self.service.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            || name.starts_with('.')
        {
            return bad(
                "service.name",
                format!(
                    "{name:?} must be non-empty and use only letters, digits, '-', '_' and '.' (it names pins and files)"
                ),
            );
        }
        if name.len() > MAX_NAME_LEN {
            return bad(
                "service.name",
                format!(
                    "is {} characters long, more than {MAX_NAME_LEN} (it names pins, files and sockets)",
                    name.len()
                ),
            );
        }
        if self.service.command.is_empty() || self.service.command[0].is_empty() {
            return bad(
                "service.command",
                "must name a program: command = [\"/path/to/worker\", \"--flag\"]".into(),
            );
        }
        if let Some(i) = self.service.command.iter().position(|a| a.contains('\0')) {
            return bad(
                &format!("service.command[{i}]"),
                "contains a NUL character, which no argument can hold".into(),
            );
        }
        if self.service.workers == 0 {
            return bad("service.workers", "must be at least 1".into());
        }
        let (min, max) = READY_TIMEOUT_BOUNDS;
        if !(min..=max).contains(&self.service.ready_timeout) {
            return bad(
                "service.ready_timeout",
                out_of_range(self.service.ready_timeout, min, max),
            );
        }
        if self.service.drain_timeout > DRAIN_TIMEOUT_MAX {
            return bad(
                "service.drain_timeout",
                out_of_range(
                    self.service.drain_timeout,
                    Duration::ZERO,
                    DRAIN_TIMEOUT_MAX,
                ),
            );
        }
        for (key, dir) in [
            ("service.runtime_dir", &self.service.runtime_dir),
            ("service.bpffs", &self.service.bpffs),
        ] {
            if !dir.is_absolute() {
                return bad(
                    key,
                    format!("{:?} must be an absolute path", dir.display().to_string()),
                );
            }
            if dir.as_os_str().as_encoded_bytes().contains(&0) {
                return bad(key, "contains a NUL character".into());
            }
        }
        for (what, socket) in [
            ("control socket", self.control_socket()),
            ("notify socket", self.notify_socket()),
        ] {
            let socket_len = socket.as_os_str().len();
            if socket_len > MAX_SOCKET_PATH_LEN {
                return bad(
                    "service.runtime_dir",
                    format!(
                        "the {what} {} would be {socket_len} bytes long, more than the {MAX_SOCKET_PATH_LEN} a unix socket path can hold; use a shorter runtime_dir (or service.name)",
                        socket.display()
                    ),
                );
            }
        }
        if self.listeners.is_empty() {
            return bad("listen", "at least one [[listen]] section is needed".into());
        }
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listen[{i}].{k}");
            if listener.name.is_empty()
                || !listener
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return bad(
                    &key("name"),
                    format!(
                        "{:?} must be non-empty and use only letters, digits, '-' and '_' (it is the LISTEN_FDNAMES entry and a pin directory)",
                        listener.name
                    ),
                );
            }
            if listener.name.len() > MAX_NAME_LEN {
                return bad(
                    &key("name"),
                    format!(
                        "is {} characters long, more than {MAX_NAME_LEN}",
                        listener.name.len()
                    ),
                );
            }
            if listener.name == "xdp" {
                return bad(
                    &key("name"),
                    "\"xdp\" is reserved for the XDP filter's pins".into(),
                );
            }
            if !names.insert(listener.name.clone()) {
                return bad(
                    &key("name"),
                    format!("{:?} is used by two listeners", listener.name),
                );
            }
            if !addresses.insert(listener.address) {
                return bad(
                    &key("address"),
                    format!("{} is used by two listeners", listener.address),
                );
            }
            if listener.address.port() == 0 {
                return bad(
                    &key("address"),
                    "needs a fixed port (0 would give every socket a different one)".into(),
                );
            }
            if listener.sockets_per_worker == 0 {
                return bad(&key("sockets_per_worker"), "must be at least 1".into());
            }
            let sockets = u64::from(self.service.workers) * u64::from(listener.sockets_per_worker);
            if sockets > u64::from(MAX_SOCKETS) {
                return bad(
                    &key("sockets_per_worker"),
                    format!(
                        "workers × sockets_per_worker = {sockets}, more than the {MAX_SOCKETS} sockets a generation can hold"
                    ),
                );
            }
            let (min, max) = FLOW_IDLE_BOUNDS;
            if !(min..=max).contains(&listener.flow_idle) {
                return bad(
                    &key("flow_idle"),
                    out_of_range(listener.flow_idle, min, max),
                );
            }
            if !(16..=(1 << 24)).contains(&listener.flow_table_size) {
                return bad(
                    &key("flow_table_size"),
                    format!(
                        "{} is out of range (16 to 16777216 entries)",
                        listener.flow_table_size
                    ),
                );
            }
            if listener.receive_buffer < 4096 || listener.receive_buffer > (1 << 31) - 1 {
                return bad(
                    &key("receive_buffer"),
                    format!(
                        "{} bytes is out of range (4KiB to 2GiB)",
                        listener.receive_buffer
                    ),
                );
            }
        }
        Ok(())
    }

    /// How a message names one of this file's keys: `<file>: <key>`.
    pub fn key(&self, key: &str) -> String {
        format!("{}: {key}", self.path.display())
    }

    /// Sockets one generation creates for a listener.
    pub fn sockets_for(&self, listener: &ListenerConfig) -> u32 {
        self.service.workers * listener.sockets_per_worker
    }

    /// The service's pin directory: `<bpffs>/<service>`.
    pub fn pin_dir(&self) -> PathBuf {
        self.service.bpffs.join(&self.service.name)
    }

    /// The listener addresses (what the XDP filter guards).
    pub fn listener_addresses(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.address).collect()
    }

    /// The control socket: `<runtime_dir>/<service>.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.service
            .runtime_dir
            .join(format!("{}.sock", self.service.name))
    }

    /// The workers' `NOTIFY_SOCKET`: `<runtime_dir>/<service>.notify`.
    pub fn notify_socket(&self) -> PathBuf {
        self.service
            .runtime_dir
            .join(format!("{}.notify", self.service.name))
    }

    /// The lock that keeps two supervisors off one service.
    pub fn lock_file(&self) -> PathBuf {
        self.service
            .runtime_dir
            .join(format!("{}.lock", self.service.name))
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, InputError> {
        Config::parse(text, Path::new("svc.toml"))
    }

    const MINIMAL: &str = r#"
[service]
name = "echo"
command = ["/bin/true"]

[[listen]]
name = "echo"
address = "127.0.0.1:5300"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.service.workers, 1);
        assert_eq!(config.service.ready, ReadyMode::Notify);
        assert_eq!(config.service.drain_timeout, Duration::from_secs(30));
        assert_eq!(config.listeners[0].receive_buffer, 4 << 20);
        assert_eq!(config.listeners[0].balance.0, BalanceMode::Random);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = MINIMAL
            .replace("workers", "wrokers")
            .replace("command =", "wrokers = 2\ncommand =");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("svc.toml:4:"), "{err}");
        assert!(err.contains("wrokers"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse(&MINIMAL.replace("127.0.0.1:5300", "localhost"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid address \"localhost\""), "{err}");
        let err = parse(&format!("{MINIMAL}balance = \"round-robin\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown balance mode"), "{err}");
        let err =
            parse(&MINIMAL.replace("[[listen]]", "[[listen]]\nreceive_buffer = \"4 parsecs\""))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("receive_buffer") || err.contains("invalid size"),
            "{err}"
        );
    }

    #[test]
    fn too_many_sockets_is_refused() {
        let text = MINIMAL
            .replace("command =", "workers = 33\ncommand =")
            .replace("[[listen]]", "[[listen]]\nsockets_per_worker = 2");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("listen[0].sockets_per_worker"), "{err}");
    }

    #[test]
    fn probe_payload_takes_text_or_hex() {
        let text = MINIMAL.replace(
            "command =",
            "ready = \"probe\"\nprobe_payload = \"hex:00 ff 10\"\ncommand =",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.service.ready, ReadyMode::Probe);
        assert_eq!(config.service.probe_payload, vec![0, 0xff, 0x10]);
        let err = parse(&MINIMAL.replace("command =", "probe_payload = \"hex:0g\"\ncommand ="))
            .unwrap_err();
        assert!(err.to_string().contains("probe_payload"), "{err}");
        let err = parse(&MINIMAL.replace("command =", "probe_payload = \"hex:+1+2\"\ncommand ="))
            .unwrap_err();
        assert!(err.to_string().contains("'+' is not a hex digit"), "{err}");
    }

    #[test]
    fn names_and_paths_are_bounded() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let err = parse(&MINIMAL.replacen("name = \"echo\"", &format!("name = \"{long}\""), 1))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("svc.toml: service.name:"), "{err}");
        let ok = "a".repeat(MAX_NAME_LEN);
        parse(&MINIMAL.replacen("name = \"echo\"", &format!("name = \"{ok}\""), 1)).unwrap();

        let with = |line: &str| MINIMAL.replace("command =", &format!("{line}\ncommand ="));
        let err = parse(&with("runtime_dir = \"run\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("service.runtime_dir") && err.contains("absolute"),
            "{err}"
        );
        let err = parse(&with("bpffs = \"bpf\"")).unwrap_err().to_string();
        assert!(
            err.contains("service.bpffs") && err.contains("absolute"),
            "{err}"
        );
        // "/<94 x r>/echo.notify" (the longer of the two sockets): 1 + 94 + 12 =
        // 107 bytes fits, one more does not.
        let dir = format!("/{}", "r".repeat(94));
        parse(&with(&format!("runtime_dir = \"{dir}\""))).unwrap();
        let err = parse(&with(&format!("runtime_dir = \"{dir}r\"")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("service.runtime_dir") && err.contains("108"),
            "{err}"
        );
        let err = parse(&MINIMAL.replace("\"/bin/true\"", "\"/bin/true\", \"a\\u0000b\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("service.command[1]"), "{err}");
    }

    #[test]
    fn durations_are_bounded() {
        let with = |line: &str| MINIMAL.replace("command =", &format!("{line}\ncommand ="));
        for (line, key) in [
            (
                "ready_timeout = \"150000000000000d\"",
                "service.ready_timeout",
            ),
            ("ready_timeout = \"0s\"", "service.ready_timeout"),
            ("ready_timeout = \"500us\"", "service.ready_timeout"),
            ("ready_timeout = \"1h 1s\"", "service.ready_timeout"),
            (
                "drain_timeout = \"150000000000000d\"",
                "service.drain_timeout",
            ),
            ("drain_timeout = \"25h\"", "service.drain_timeout"),
        ] {
            let err = parse(&with(line)).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("svc.toml: {key}: must be between")),
                "{err}"
            );
        }
        for line in [
            "ready_timeout = \"1ms\"",
            "ready_timeout = \"1h\"",
            "drain_timeout = \"0s\"",
            "drain_timeout = \"24h\"",
        ] {
            parse(&with(line)).unwrap();
        }
        let listen = |line: &str| format!("{MINIMAL}{line}\n");
        for bad in ["99ms", "24h 1ms", "150000000000000d"] {
            let err = parse(&listen(&format!("flow_idle = \"{bad}\"")))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("svc.toml: listen[0].flow_idle:"), "{err}");
        }
        parse(&listen("flow_idle = \"24h\"")).unwrap();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_byte_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_byte_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_byte_size("65536").unwrap(), 65536);
        assert!(parse_byte_size("4 parsecs").is_err());
    }
}
