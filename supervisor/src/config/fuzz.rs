//! Property tests of the config parser with generated input: random text, valid
//! files mutated (values swapped for hostile ones, lines dropped, doubled, cut),
//! and files assembled from the known keys with generated values.
//!
//! Whatever the input, [`Config::parse`] never panics; a refusal is an
//! [`InputError`] on one line that starts with the file's path; and whatever it
//! accepts is within every documented bound (so nothing later can overflow or
//! fail on it: an `Instant` plus `ready_timeout`, the control socket's path).
//!
//! `cargo test` runs 1000 cases per property (a few seconds); a longer run is
//! `PROPTEST_CASES=100000 cargo test -p supervisor --lib config::fuzz` (see
//! `scripts/fuzz.sh`).
use std::{path::Path, time::Instant};

use proptest::{prelude::*, sample::Index, test_runner::TestCaseError};

use super::*;

const FILE: &str = "fuzz/svc.toml";

/// 1000 cases per property unless `PROPTEST_CASES` says otherwise.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

pub(super) const MINIMAL: &str = r#"[service]
name = "echo"
command = ["/bin/true"]

[[listen]]
name = "echo"
address = "127.0.0.1:5300"
"#;

/// Every key, with values of every kind the contract allows.
pub(super) const FULL: &str = r#"[service]
name = "echo.svc-1"
command = ["/usr/local/bin/echo-worker", "--read-deadline-ms", "200"]
workers = 4
user = "nobody"
ready = "probe"
probe_payload = "hex:00 01 02"
ready_timeout = "10s"
drain_signal = "SIGUSR2"
drain_timeout = "1m 30s"
runtime_dir = "/run/supervisor"
bpffs = "/sys/fs/bpf/supervisor"
handoff = "listen-fds"

[[listen]]
name = "dns"
address = "127.0.0.1:5300"
sockets_per_worker = 2
receive_buffer = "8MiB"
balance = "flow"
flow_idle = "30s"
flow_table_size = 65536
cookie_offset = 4

[[listen]]
name = "dns6"
address = "[::1]:5300"
balance = "cookie"

[xdp]
interface = "lo"
mode = "generic"
deny = ["192.0.2.0/24", "2001:db8::/32"]
allow = []
rate_limit = { packets_per_second = 1000, burst = 2000 }
drop_malformed = true
"#;

const SERVICE_KEYS: &[&str] = &[
    "name",
    "command",
    "workers",
    "user",
    "ready",
    "probe_payload",
    "ready_timeout",
    "drain_signal",
    "drain_timeout",
    "runtime_dir",
    "bpffs",
    "handoff",
];
const LISTEN_KEYS: &[&str] = &[
    "name",
    "address",
    "sockets_per_worker",
    "receive_buffer",
    "balance",
    "flow_idle",
    "flow_table_size",
    "cookie_offset",
];
const XDP_KEYS: &[&str] = &[
    "interface",
    "mode",
    "deny",
    "allow",
    "rate_limit",
    "drop_malformed",
];

/// A TOML basic string holding `text`, escaped as TOML wants it.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// Values a key may be given, valid or hostile, as TOML text.
fn value() -> impl Strategy<Value = String> {
    let units = prop::sample::select(vec![
        "ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y", "days", "",
    ]);
    prop_oneof![
        // Durations: huge, tiny, zero, sums.
        (any::<u64>(), units.clone()).prop_map(|(n, u)| format!("\"{n}{u}\"")),
        (0u64..100_000, units.clone()).prop_map(|(n, u)| format!("\"{n}{u}\"")),
        (0u64..1000, units.clone(), 0u64..1000, units)
            .prop_map(|(a, u, b, v)| format!("\"{a}{u} {b}{v}\"")),
        // Numbers.
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..100).prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("18446744073709551616".to_string()),
        Just("-0".to_string()),
        Just("nan".to_string()),
        // Sizes.
        (
            any::<u64>(),
            prop::sample::select(vec!["", "K", "KiB", "M", "MB", "G", "GiB", "T", " parsecs"])
        )
            .prop_map(|(n, u)| format!("\"{n}{u}\"")),
        // Strings of every sort, names, paths, addresses, signals, payloads.
        any::<String>().prop_map(|s| toml_string(&s)),
        "[a-zA-Z0-9._/-]{0,120}".prop_map(|s| toml_string(&s)),
        ("/[a-z/]{0,20}", 0usize..200)
            .prop_map(|(p, n)| toml_string(&format!("{p}{}", "r".repeat(n)))),
        prop::sample::select(vec![
            "\"\"",
            "\".\"",
            "\"..\"",
            "\"xdp\"",
            "\"relative/dir\"",
            "\"/\"",
            "\"a\\u0000b\"",
            "\"127.0.0.1:0\"",
            "\"0.0.0.0:53\"",
            "\"[::]:65535\"",
            "\"1.2.3.4:99999\"",
            "\"localhost:53\"",
            "\"SIGKILL\"",
            "\"KILL\"",
            "\"SIGFOO\"",
            "\"SIGRTMIN+3\"",
            "\"hex:\"",
            "\"hex:0\"",
            "\"hex:zz\"",
            "\"hex:+1+2\"",
            "\"hex:00 ff\"",
            "\"notify\"",
            "\"exec\"",
            "\"probe\"",
            "\"random\"",
            "\"hash\"",
            "\"flow\"",
            "\"cookie\"",
            "\"native\"",
            "\"generic\"",
            "\"auto\"",
            "\"lo\"",
            "\"eth99\"",
            "\"10.1.2.3/8\"",
            "\"::/0\"",
            "\"192.0.2.0/33\"",
        ])
        .prop_map(str::to_string),
        // Other TOML types.
        any::<bool>().prop_map(|b| b.to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        prop::collection::vec(any::<String>(), 0..4).prop_map(|items| format!(
            "[{}]",
            items
                .iter()
                .map(|s| toml_string(s))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (any::<u64>(), any::<u64>()).prop_map(|(p, b)| format!(
            "{{ packets_per_second = {}, burst = {} }}",
            p % (1 << 62),
            b % (1 << 62)
        )),
        Just("{ packets_per_second = 0 }".to_string()),
        Just("{}".to_string()),
        Just("[[1], \"a\"]".to_string()),
    ]
}

/// One edit of a config file's text.
#[derive(Debug, Clone)]
enum Mutation {
    /// The value of the `key = value` line at the index, replaced.
    ReplaceValue(Index, String),
    DeleteLine(Index),
    DuplicateLine(Index),
    /// A `key = value` line (a known key, or any text) inserted before the index.
    InsertLine(Index, String, String),
    InsertChar(Index, char),
    Truncate(Index),
}

fn key() -> impl Strategy<Value = String> {
    let known: Vec<&str> = SERVICE_KEYS
        .iter()
        .chain(LISTEN_KEYS)
        .chain(XDP_KEYS)
        .copied()
        .collect();
    prop_oneof![
        4 => prop::sample::select(known).prop_map(str::to_string),
        1 => "[a-z_]{1,12}",
        1 => any::<String>().prop_map(|s| toml_string(&s)),
        1 => Just("[[listen]]".to_string()),
        1 => Just("[xdp]".to_string()),
        1 => Just("[service]".to_string()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), value()).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        1 => any::<Index>().prop_map(Mutation::DeleteLine),
        1 => any::<Index>().prop_map(Mutation::DuplicateLine),
        2 => (any::<Index>(), key(), value()).prop_map(|(i, k, v)| Mutation::InsertLine(i, k, v)),
        1 => (any::<Index>(), any::<char>()).prop_map(|(i, c)| Mutation::InsertChar(i, c)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for mutation in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        match mutation {
            Mutation::ReplaceValue(i, value) => {
                let at = i.index(lines.len());
                let line = &mut lines[at];
                if let Some((k, _)) = line.split_once(" = ") {
                    *line = format!("{k} = {value}");
                }
            }
            Mutation::DeleteLine(i) => {
                lines.remove(i.index(lines.len()));
            }
            Mutation::DuplicateLine(i) => {
                let at = i.index(lines.len());
                lines.insert(at, lines[at].clone());
            }
            Mutation::InsertLine(i, key, value) => {
                let at = i.index(lines.len() + 1);
                let line = if key.starts_with('[') {
                    key.clone()
                } else {
                    format!("{key} = {value}")
                };
                lines.insert(at, line);
            }
            Mutation::InsertChar(i, c) => {
                let mut joined = lines.join("\n");
                let boundaries: Vec<usize> = joined
                    .char_indices()
                    .map(|(at, _)| at)
                    .chain([joined.len()])
                    .collect();
                joined.insert(boundaries[i.index(boundaries.len())], *c);
                lines = joined.split('\n').map(str::to_string).collect();
            }
            Mutation::Truncate(i) => {
                let joined = lines.join("\n");
                let boundaries: Vec<usize> = joined
                    .char_indices()
                    .map(|(at, _)| at)
                    .chain([joined.len()])
                    .collect();
                let cut = boundaries[i.index(boundaries.len())];
                lines = joined[..cut].split('\n').map(str::to_string).collect();
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// A file assembled from the known keys (or others) with generated values.
fn assembled() -> impl Strategy<Value = String> {
    let table = |keys: &'static [&'static str]| {
        prop::collection::vec(
            (
                prop_oneof![
                    5 => prop::sample::select(keys).prop_map(str::to_string),
                    1 => "[a-z_]{1,10}",
                ],
                value(),
            ),
            0..12,
        )
    };
    (
        table(SERVICE_KEYS),
        prop::collection::vec(table(LISTEN_KEYS), 0..3),
        prop::option::of(table(XDP_KEYS)),
    )
        .prop_map(|(service, listeners, xdp)| {
            let render = |entries: &[(String, String)]| {
                entries
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}\n"))
                    .collect::<String>()
            };
            let mut text = format!("[service]\n{}", render(&service));
            for listener in &listeners {
                text.push_str(&format!("\n[[listen]]\n{}", render(listener)));
            }
            if let Some(xdp) = xdp {
                text.push_str(&format!("\n[xdp]\n{}", render(&xdp)));
            }
            text
        })
}

/// The properties every parse must have, accepted or refused.
fn check(text: &str) -> Result<(), TestCaseError> {
    match Config::parse(text, Path::new(FILE)) {
        Ok(config) => within_bounds(&config),
        Err(e) => {
            let message = e.to_string();
            prop_assert!(
                message.starts_with(FILE),
                "a refusal must start with the file's path: {message:?}"
            );
            prop_assert!(
                !message.contains(['\n', '\r']),
                "a refusal must be one line: {message:?}"
            );
            Ok(())
        }
    }
}

/// What an accepted config promises the rest of the supervisor.
fn within_bounds(config: &Config) -> Result<(), TestCaseError> {
    let service = &config.service;
    prop_assert!(!service.name.is_empty() && service.name.len() <= MAX_NAME_LEN);
    prop_assert!(!service.name.starts_with('.'));
    prop_assert!(
        service
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    );
    prop_assert!(!service.command.is_empty() && !service.command[0].is_empty());
    prop_assert!(service.command.iter().all(|a| !a.contains('\0')));
    prop_assert!(service.workers >= 1);
    let (min, max) = READY_TIMEOUT_BOUNDS;
    prop_assert!((min..=max).contains(&service.ready_timeout));
    prop_assert!(service.drain_timeout <= DRAIN_TIMEOUT_MAX);
    // What the daemon computes from them cannot overflow.
    prop_assert!(Instant::now().checked_add(service.ready_timeout).is_some());
    prop_assert!(Instant::now().checked_add(service.drain_timeout).is_some());
    prop_assert!(service.runtime_dir.is_absolute() && service.bpffs.is_absolute());
    prop_assert!(config.control_socket().as_os_str().len() <= MAX_SOCKET_PATH_LEN);
    prop_assert!(config.notify_socket().as_os_str().len() <= MAX_SOCKET_PATH_LEN);
    prop_assert!(!service.probe_payload.is_empty());
    prop_assert!(!config.listeners.is_empty());
    for listener in &config.listeners {
        prop_assert!(!listener.name.is_empty() && listener.name.len() <= MAX_NAME_LEN);
        prop_assert!(listener.name != "xdp");
        prop_assert!(listener.address.port() != 0);
        let sockets = u64::from(service.workers) * u64::from(listener.sockets_per_worker);
        prop_assert!((1..=u64::from(MAX_SOCKETS)).contains(&sockets));
        let (min, max) = FLOW_IDLE_BOUNDS;
        prop_assert!((min..=max).contains(&listener.flow_idle));
        prop_assert!(u32::try_from(listener.flow_idle.as_millis()).is_ok());
        prop_assert!((16..=(1 << 24)).contains(&listener.flow_table_size));
        prop_assert!((4096..(1u64 << 31)).contains(&listener.receive_buffer));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_text_never_panics(text in prop_oneof![
        any::<String>(),
        "[\\[\\]a-z_=\"\\n .0-9#{},:/-]{0,400}",
    ]) {
        check(&text)?;
    }

    #[test]
    fn mutated_valid_files_never_panic(
        seed in prop::sample::select(vec![MINIMAL, FULL]),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        check(&apply(seed, &mutations))?;
    }

    #[test]
    fn assembled_files_never_panic(text in assembled()) {
        check(&text)?;
    }
}

#[test]
fn the_seeds_are_valid() {
    for seed in [MINIMAL, FULL] {
        let config = Config::parse(seed, Path::new(FILE)).unwrap();
        within_bounds(&config).unwrap();
    }
}
