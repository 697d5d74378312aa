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

fn parse_u32(value: Option<OsString>) -> Option<u32> {
    value?.to_str()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers_only() {
        assert_eq!(parse_u32(Some("7".into())), Some(7));
        assert_eq!(parse_u32(Some(" 0 ".into())), Some(0));
        assert_eq!(parse_u32(Some("seven".into())), None);
        assert_eq!(parse_u32(Some("-1".into())), None);
        assert_eq!(parse_u32(None), None);
    }
}
