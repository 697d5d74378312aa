//! What `supervisor status` shows of the filter.

use serde::{Deserialize, Serialize};

use super::{AttachMode, RateLimit};

/// Counters per verdict and reason, summed over CPUs (packets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpCounters {
    /// The service's datagrams that passed every rule.
    pub passed: u64,
    pub denied: u64,
    pub not_allowed: u64,
    pub rate_limited: u64,
    pub malformed: u64,
    /// Everything else, passed untouched.
    pub not_ours: u64,
    /// Non-first UDP fragments, passed untouched (their first fragment was judged).
    pub fragments: u64,
    /// Bytes of all dropped packets.
    pub dropped_bytes: u64,
}

impl XdpCounters {
    pub fn dropped(&self) -> u64 {
        self.denied + self.not_allowed + self.rate_limited + self.malformed
    }
}

/// What `supervisor status` shows for the filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XdpStatus {
    pub interface: String,
    pub ifindex: u32,
    pub link_id: u32,
    pub program_id: u32,
    pub mode: AttachMode,
    pub ruleset_generation: u32,
    pub deny: usize,
    pub allow: usize,
    pub rate_limit: Option<RateLimit>,
    pub drop_malformed: bool,
    pub counters: XdpCounters,
    /// The program's runs and total run time: non-zero only while
    /// `kernel.bpf_stats_enabled = 1`. Their ratio is the per-packet cost.
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl XdpStatus {
    /// Human-readable lines for `supervisor status`.
    pub fn render(&self) -> String {
        let c = &self.counters;
        let mut out = format!(
            "xdp: {} (ifindex {}), {} mode, link {}, program {}, ruleset {}\n  rules: {} deny, {} allow{}{}\n  passed {}, dropped {} (denied {}, not allowed {}, rate limited {}, malformed {}), not ours {}, fragments {}\n",
            self.interface,
            self.ifindex,
            self.mode,
            self.link_id,
            self.program_id,
            self.ruleset_generation,
            self.deny,
            self.allow,
            match &self.rate_limit {
                Some(r) => format!(
                    ", rate limit {}/s burst {}",
                    r.packets_per_second,
                    r.burst()
                ),
                None => String::new(),
            },
            if self.drop_malformed {
                ", malformed dropped"
            } else {
                ""
            },
            c.passed,
            c.dropped(),
            c.denied,
            c.not_allowed,
            c.rate_limited,
            c.malformed,
            c.not_ours,
            c.fragments,
        );
        if self.run_count > 0 {
            out.push_str(&format!(
                "  cost: {:.1} ns per packet over {} runs\n",
                self.run_time_ns as f64 / self.run_count as f64,
                self.run_count
            ));
        }
        out
    }
}
