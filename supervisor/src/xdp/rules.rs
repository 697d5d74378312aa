//! From `[xdp]` and the listeners to the exact map entries of one ruleset. Pure
//! code: validation and compilation are one step, so what was validated is what
//! gets installed.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use supervisor_common::xdp::{
    FAMILY_V4, FAMILY_V6, ListenerKey, ListenerPort, ListenerRule, MAX_LISTENER_KEYS, MAX_PREFIXES,
    PORT_V4_ANY, PORT_V4_MANY, PORT_V4_ONE, PORT_V6_ANY, PORT_V6_MANY, PORT_V6_ONE,
    RULE_DROP_MALFORMED, RULE_RATE_LIMIT, VERDICT_ALLOW, VERDICT_DENY, VERDICT_NOT_ALLOWED,
};

use super::{
    XdpConfig,
    prefix_table::{self, PrefixTable},
};

/// A source prefix with its host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    fn max_len(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// `addr` with everything after the first `len` bits cleared.
    fn masked(addr: IpAddr, len: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let mask = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len))
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(len))
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Parses "192.0.2.0/24", "2001:db8::/32", or a bare address (= /32 or /128).
/// Host bits must be zero: "10.1.2.3/8" is refused rather than guessed at.
pub fn parse_prefix(text: &str) -> Result<Prefix, String> {
    let trimmed = text.trim();
    let (addr_text, len_text) = match trimmed.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (trimmed, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| {
        format!("{text:?} is not an IPv4 or IPv6 prefix; write e.g. \"192.0.2.0/24\", \"2001:db8::/32\" or a single address")
    })?;
    let max = Prefix::max_len(addr);
    let len =
        match len_text {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                format!("{text:?}: prefix length must be a number from 0 to {max}")
            })?,
        };
    let masked = Prefix::masked(addr, len);
    if masked != addr {
        return Err(format!(
            "{text:?} has bits set after the first {len}; did you mean \"{masked}/{len}\"?"
        ));
    }
    Ok(Prefix { addr, len })
}

/// The entries of one ruleset's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// (prefix length, address, verdict), resolved so the longest match answers.
    pub v4: Vec<(u32, [u8; 4], u32)>,
    /// `v4` expanded for `PREFIXES_V4` and `PREFIXES_V4_CHUNKS`.
    pub v4_table: PrefixTable,
    /// (prefix length, address, verdict), resolved so the longest match answers.
    pub v6: Vec<(u32, [u8; 16], u32)>,
    /// `v6` expanded for `PREFIXES_V6` and `PREFIXES_V6_CHUNKS`; `v6` goes into
    /// `PREFIXES_V6_TRIE` too when the table asks the trie anywhere.
    pub v6_table: PrefixTable,
    pub listeners: Vec<(ListenerKey, ListenerRule)>,
    /// The non-empty `LISTENER_PORTS` entries, by port.
    pub ports: Vec<(u16, ListenerPort)>,
    /// The one rule every listener of the ruleset has (`RULES`).
    pub rule: ListenerRule,
}

/// A bad key and what is wrong with it, e.g. ("xdp.deny[2]", "... is not a prefix").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn error(key: impl Into<String>, message: impl Into<String>) -> RuleError {
    RuleError {
        key: key.into(),
        message: message.into(),
    }
}

/// Nanoseconds per datagram at `packets_per_second` (GCRA's emission interval).
pub fn interval_ns(packets_per_second: u64) -> u64 {
    (1_000_000_000 / packets_per_second.max(1)).max(1)
}

/// Validates `[xdp]` (except the interface, which needs the system) and compiles it
/// with the listeners into map entries.
pub fn compile(config: &XdpConfig, listeners: &[SocketAddr]) -> Result<Ruleset, RuleError> {
    let parse_all = |key: &str, list: &[String]| -> Result<Vec<Prefix>, RuleError> {
        list.iter()
            .enumerate()
            .map(|(i, text)| parse_prefix(text).map_err(|m| error(format!("xdp.{key}[{i}]"), m)))
            .collect()
    };
    let deny = parse_all("deny", &config.deny)?;
    let allow = parse_all("allow", &config.allow)?;

    let mut flags = 0;
    let (mut interval, mut tolerance) = (0, 0);
    if config.drop_malformed {
        flags |= RULE_DROP_MALFORMED;
    }
    if let Some(rate) = &config.rate_limit {
        const MAX: u64 = 1_000_000_000;
        if rate.packets_per_second == 0 || rate.packets_per_second > MAX {
            return Err(error(
                "xdp.rate_limit.packets_per_second",
                format!("{} is out of range (1 to {MAX})", rate.packets_per_second),
            ));
        }
        let burst = rate.burst();
        if burst == 0 || burst > MAX {
            return Err(error(
                "xdp.rate_limit.burst",
                format!("{burst} is out of range (1 to {MAX})"),
            ));
        }
        flags |= RULE_RATE_LIMIT;
        interval = interval_ns(rate.packets_per_second);
        tolerance = (burst - 1) * interval;
    }

    // One table per family, resolved so that a single longest-prefix lookup answers
    // "deny wins": every deny prefix is stored; an allow prefix only when no deny
    // prefix contains it (a deny prefix inside an allow prefix is longer, so it
    // matches first); and, with a non-empty allow list, /0 = not allowed.
    let denied: HashSet<Prefix> = deny.iter().copied().collect();
    let covered_by_deny = |p: &Prefix| {
        (0..=p.len).any(|len| {
            denied.contains(&Prefix {
                addr: Prefix::masked(p.addr, len),
                len,
            })
        })
    };
    let mut entries: HashMap<Prefix, u32> = HashMap::new();
    if !allow.is_empty() {
        for any in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            entries.insert(Prefix { addr: any, len: 0 }, VERDICT_NOT_ALLOWED);
        }
    }
    for p in allow.iter().filter(|p| !covered_by_deny(p)) {
        entries.insert(*p, VERDICT_ALLOW);
    }
    for p in &deny {
        entries.insert(*p, VERDICT_DENY);
    }
    let mut ruleset = Ruleset::default();
    for (prefix, verdict) in entries {
        match prefix.addr {
            IpAddr::V4(a) => ruleset
                .v4
                .push((u32::from(prefix.len), a.octets(), verdict)),
            IpAddr::V6(a) => ruleset
                .v6
                .push((u32::from(prefix.len), a.octets(), verdict)),
        }
    }
    for (family, count) in [("IPv4", ruleset.v4.len()), ("IPv6", ruleset.v6.len())] {
        if count > MAX_PREFIXES as usize {
            return Err(error(
                "xdp.deny/xdp.allow",
                format!(
                    "{count} {family} prefixes, more than the {MAX_PREFIXES} one ruleset holds"
                ),
            ));
        }
    }
    // Deterministic order, for tests and for reading a dump.
    ruleset.v4.sort();
    ruleset.v6.sort();
    ruleset.v4_table = prefix_table::expand(&ruleset.v4, prefix_table::V4_CAPACITY)
        .map_err(|m| error("xdp.deny/xdp.allow", m))?;
    ruleset.v6_table = prefix_table::expand(&ruleset.v6, prefix_table::V6_CAPACITY)
        .map_err(|m| error("xdp.deny/xdp.allow", m))?;

    let rule = ListenerRule {
        flags,
        _pad: 0,
        interval_ns: interval,
        tolerance_ns: tolerance,
    };
    let mut keys = HashSet::new();
    for address in listeners {
        // The listener itself and its "address only" entry (port 0).
        for port in [address.port(), 0] {
            keys.insert(listener_key(address.ip(), port));
        }
    }
    if keys.len() > MAX_LISTENER_KEYS as usize {
        return Err(error(
            "listen",
            format!(
                "{} listeners, more than the {} the XDP filter holds",
                listeners.len(),
                MAX_LISTENER_KEYS / 2
            ),
        ));
    }
    ruleset.listeners = keys.into_iter().map(|key| (key, rule)).collect();
    ruleset
        .listeners
        .sort_by_key(|(key, _)| (key.family, key.addr, key.port));
    ruleset.ports = listener_ports(listeners);
    ruleset.rule = rule;
    Ok(ruleset)
}

/// The `LISTENER_PORTS` entries: per port (and port 0 for "any port"), whether a
/// family has a wildcard listener, exactly one address, or several (then the
/// program asks the `LISTENERS` hash).
fn listener_ports(listeners: &[SocketAddr]) -> Vec<(u16, ListenerPort)> {
    let mut ports: HashMap<u16, ListenerPort> = HashMap::new();
    for address in listeners {
        for port in [address.port(), 0] {
            let entry = ports.entry(port).or_default();
            let (any, one, many) = match address.ip() {
                IpAddr::V4(_) => (PORT_V4_ANY, PORT_V4_ONE, PORT_V4_MANY),
                IpAddr::V6(_) => (PORT_V6_ANY, PORT_V6_ONE, PORT_V6_MANY),
            };
            if address.ip().is_unspecified() {
                entry.flags |= any;
                continue;
            }
            let same = match address.ip() {
                IpAddr::V4(a) => entry.v4 == a.octets(),
                IpAddr::V6(a) => entry.v6 == a.octets(),
            };
            if entry.flags & many != 0 || (entry.flags & one != 0 && same) {
                continue;
            }
            if entry.flags & one != 0 {
                entry.flags = (entry.flags & !one) | many;
                continue;
            }
            entry.flags |= one;
            match address.ip() {
                IpAddr::V4(a) => entry.v4 = a.octets(),
                IpAddr::V6(a) => entry.v6 = a.octets(),
            }
        }
    }
    let mut ports: Vec<(u16, ListenerPort)> = ports.into_iter().collect();
    ports.sort_by_key(|(port, _)| *port);
    ports
}

/// The listener table key for (address, port); see `ListenerKey`.
pub fn listener_key(ip: IpAddr, port: u16) -> ListenerKey {
    let mut addr = [0u8; 16];
    let family = match ip {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            FAMILY_V4
        }
        IpAddr::V6(a) => {
            addr = a.octets();
            FAMILY_V6
        }
    };
    ListenerKey {
        addr,
        port: port.to_be_bytes(),
        family,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xdp::{RateLimit, XdpMode};

    fn config(deny: &[&str], allow: &[&str]) -> XdpConfig {
        XdpConfig {
            interface: "lo".into(),
            mode: XdpMode::Auto,
            deny: deny.iter().map(|s| s.to_string()).collect(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            rate_limit: None,
            drop_malformed: true,
        }
    }

    #[test]
    fn prefixes_parse_and_bad_ones_are_explained() {
        assert_eq!(
            parse_prefix("192.0.2.0/24").unwrap().to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(parse_prefix("192.0.2.7").unwrap().len, 32);
        assert_eq!(parse_prefix("2001:db8::/32").unwrap().len, 32);
        assert_eq!(parse_prefix("::1").unwrap().len, 128);
        assert_eq!(parse_prefix("0.0.0.0/0").unwrap().len, 0);
        let err = parse_prefix("10.1.2.3/8").unwrap_err();
        assert!(err.contains("did you mean \"10.0.0.0/8\""), "{err}");
        assert!(parse_prefix("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(
            parse_prefix("example.com")
                .unwrap_err()
                .contains("not an IPv4 or IPv6 prefix")
        );
        assert!(parse_prefix("2001:db8::/129").is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let err = compile(&config(&["10.0.0.0/8", "nonsense"], &[]), &[]).unwrap_err();
        assert_eq!(err.key, "xdp.deny[1]");
        let err = compile(&config(&[], &["10.0.0.1/40"]), &[]).unwrap_err();
        assert_eq!(err.key, "xdp.allow[0]");
        let mut c = config(&[], &[]);
        c.rate_limit = Some(RateLimit {
            packets_per_second: 0,
            burst: None,
        });
        assert_eq!(
            compile(&c, &[]).unwrap_err().key,
            "xdp.rate_limit.packets_per_second"
        );
    }

    #[test]
    fn deny_wins_over_allow_in_one_lookup() {
        let ruleset = compile(
            &config(
                &["10.0.0.0/8", "10.9.9.0/24"],
                &["10.1.0.0/16", "10.9.0.0/16", "192.0.2.0/24"],
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            ruleset.v4,
            vec![
                (0, [0, 0, 0, 0], VERDICT_NOT_ALLOWED),
                (8, [10, 0, 0, 0], VERDICT_DENY),
                (24, [10, 9, 9, 0], VERDICT_DENY),
                (24, [192, 0, 2, 0], VERDICT_ALLOW),
            ],
            "allow prefixes inside a deny prefix are dropped"
        );
        // A non-empty allow list makes every other source not allowed, IPv6 too.
        assert_eq!(ruleset.v6, vec![(0, [0; 16], VERDICT_NOT_ALLOWED)]);
    }

    #[test]
    fn empty_allow_list_allows_everything_not_denied() {
        let ruleset = compile(&config(&["2001:db8::/32"], &[]), &[]).unwrap();
        assert!(ruleset.v4.is_empty());
        assert_eq!(ruleset.v6.len(), 1);
        assert_eq!(ruleset.v6[0].2, VERDICT_DENY);
    }

    #[test]
    fn listeners_get_an_address_only_entry_and_the_rule() {
        let mut c = config(&[], &[]);
        c.rate_limit = Some(RateLimit {
            packets_per_second: 1000,
            burst: Some(10),
        });
        let ruleset = compile(
            &c,
            &["10.0.0.1:53".parse().unwrap(), "[::]:53".parse().unwrap()],
        )
        .unwrap();
        let keys: Vec<_> = ruleset
            .listeners
            .iter()
            .map(|(k, _)| (k.family, k.port))
            .collect();
        assert_eq!(
            keys,
            vec![(4, [0, 0]), (4, [0, 53]), (6, [0, 0]), (6, [0, 53])]
        );
        let rule = ruleset.listeners[0].1;
        assert_eq!(ruleset.rule, rule);
        assert_eq!(rule.flags, RULE_DROP_MALFORMED | RULE_RATE_LIMIT);
        assert_eq!(rule.interval_ns, 1_000_000);
        assert_eq!(rule.tolerance_ns, 9_000_000);
        assert_eq!(&ruleset.listeners[1].0.addr[..4], &[10, 0, 0, 1]);
    }

    #[test]
    fn listener_ports_say_any_one_or_many() {
        let listeners: Vec<SocketAddr> = [
            "10.0.0.1:53",
            "10.0.0.2:53",
            "[2001:db8::1]:53",
            "0.0.0.0:123",
            "10.0.0.1:123",
            "[::]:5353",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let ports = listener_ports(&listeners);
        let flags: Vec<(u16, u32)> = ports.iter().map(|(p, e)| (*p, e.flags)).collect();
        assert_eq!(
            flags,
            vec![
                (0, PORT_V4_ANY | PORT_V4_MANY | PORT_V6_ANY | PORT_V6_ONE),
                (53, PORT_V4_MANY | PORT_V6_ONE),
                (123, PORT_V4_ANY | PORT_V4_ONE),
                (5353, PORT_V6_ANY),
            ]
        );
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(ports[1].1.v6, v6.octets());
        assert_eq!(ports[2].1.v4, [10, 0, 0, 1]);
    }
}
