//! Which generation and which worker this process is, from the variables the
//! supervisor adds to the socket-activation ones.
//!
//! Workers use them to label what they report (logs, status, the echo
//! protocol's trailer); nothing in the protocols depends on them. Under plain
//! systemd or by hand they are unset.

use std::ffi::OsString;

/// `SUPERVISOR_GENERATION`: the generation this worker belongs to (1, 2, ...).
/// `None` when unset or not a number.
pub fn generation() -> Option<u32> {
    parse_u32(std::env::var_os("SUPERVISOR_GENERATION"))
}

/// `SUPERVISOR_WORKER`: this worker's 0-based index within its generation.
/// `None` when unset or not a number.
pub fn worker_index() -> Option<u32> {
    parse_u32(std::env::var_os("SUPERVISOR_WORKER"))
}

/// `SUPERVISOR_COOKIES`: the selector cookie of each inherited socket, in fd
/// order (aligned with `LISTEN_FDNAMES`), colon-separated decimal `u16`s.
///
/// With `balance = "cookie"` a worker puts the cookie of the socket that received
/// a client's first datagram into its reply (e.g. in a QUIC connection id); the
/// client echoes it at the listener's `cookie_offset` (big-endian) and every later
/// datagram reaches the same socket, also after an upgrade, while that
/// generation lives. `None` when unset or malformed.
pub fn cookies() -> Option<Vec<u16>> {
    parse_cookies(std::env::var_os("SUPERVISOR_COOKIES")?.to_str()?)
}

fn parse_cookies(text: &str) -> Option<Vec<u16>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(':').map(|c| c.trim().parse().ok()).collect()
}

fn parse_u32(value: Option<OsString>) -> Option<u32> {
    value?.to_str()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cookie_lists() {
        assert_eq!(parse_cookies("513:514"), Some(vec![513, 514]));
        assert_eq!(parse_cookies(""), Some(vec![]));
        assert_eq!(parse_cookies("513:x"), None);
    }

    #[test]
    fn parses_numbers_only() {
        assert_eq!(parse_u32(Some("7".into())), Some(7));
        assert_eq!(parse_u32(Some(" 0 ".into())), Some(0));
        assert_eq!(parse_u32(Some("seven".into())), None);
        assert_eq!(parse_u32(Some("-1".into())), None);
        assert_eq!(parse_u32(None), None);
    }
}
