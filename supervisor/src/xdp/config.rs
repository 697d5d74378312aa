//! `[xdp]` in the service's config, and its validation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{AttachMode, rules};
use crate::error::InputError;

/// `[xdp]` in the service's config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    /// The interface the filter attaches to, e.g. "eth0".
    pub interface: String,
    #[serde(default)]
    pub mode: XdpMode,
    /// Source prefixes whose datagrams to the service are dropped.
    #[serde(default)]
    pub deny: Vec<String>,
    /// If not empty: only these sources may reach the service (deny still wins).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Per source address, over all the service's listeners.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default = "default_true")]
    pub drop_malformed: bool,
}

fn default_true() -> bool {
    true
}

/// Where the program runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver; an error if the driver cannot.
    Native,
    /// In the generic stack (after the skb is built: slower, works everywhere).
    Generic,
    /// Native if the driver can, else generic.
    #[default]
    Auto,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Auto => "auto",
        })
    }
}

impl XdpMode {
    pub(super) fn accepts(self, attached: AttachMode) -> bool {
        match self {
            XdpMode::Native => attached == AttachMode::Native,
            XdpMode::Generic => attached == AttachMode::Generic,
            XdpMode::Auto => attached != AttachMode::Offload,
        }
    }
}

/// `rate_limit = { packets_per_second = 1000, burst = 2000 }`: per source address,
/// a sustained rate and how many datagrams may arrive at once (default: one
/// second's worth).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub packets_per_second: u64,
    #[serde(default)]
    pub burst: Option<u64>,
}

impl RateLimit {
    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or(self.packets_per_second)
    }
}

impl XdpConfig {
    /// Checks everything `start` and `apply` would refuse for bad input: prefixes,
    /// rate limit, and that the interface exists. Messages name the file, the key
    /// and the value.
    pub fn validate(&self, file: &Path) -> Result<(), InputError> {
        rules::compile(self, &[])
            .map_err(|e| InputError::new(format!("{}: {e}", file.display())))?;
        interface_index(&self.interface)
            .map(|_| ())
            .map_err(|e| InputError::new(format!("{}: xdp.interface: {e}", file.display())))
    }
}

/// The interface's index in the calling thread's network namespace.
pub(super) fn interface_index(name: &str) -> Result<u32, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    nix::net::if_::if_nametoindex(name).map_err(|_| {
        format!("no interface {name:?} on this host (in the supervisor's network namespace)")
    })
}
