//! The XDP filter's maps contract.
//!
//! The filter (`supervisor-ebpf/src/xdp_filter.rs`) and its manager
//! (`supervisor/src/xdp/`) share everything below. Per service and interface it is
//! pinned under `<bpffs>/<service>/xdp/<ifname>/`:
//!
//! | map                  | type                                  | key                      | value |
//! |----------------------|---------------------------------------|--------------------------|-------|
//! | `CONTROL`            | `ARRAY` (1 entry, mmapable)           | `0`                      | [`RulesetControl`] as `u64` |
//! | `LISTENER_PORTS`     | `ARRAY_OF_MAPS` of `ARRAY` (65 536)   | ruleset slot             | destination port → [`ListenerPort`] |
//! | `RULES`              | `ARRAY` ([`RULESET_SLOTS`] entries)    | ruleset slot             | the ruleset's [`ListenerRule`] |
//! | `LISTENERS`          | `ARRAY_OF_MAPS` of `HASH`             | ruleset slot             | [`ListenerKey`] → [`ListenerRule`] |
//! | `PREFIXES_V4`        | `ARRAY_OF_MAPS` of `ARRAY` ([`PREFIX_FIRST_ENTRIES`]) | ruleset slot | first 16 bits of the source → [`prefix_table`] entry |
//! | `PREFIXES_V4_CHUNKS` | `ARRAY_OF_MAPS` of `ARRAY` ([`V4_CHUNK_TABLE_ENTRIES`]) | ruleset slot | chunk × 256 + next 8 bits → [`prefix_table`] entry |
//! | `PREFIXES_V6`        | `ARRAY_OF_MAPS` of `ARRAY` ([`PREFIX_FIRST_ENTRIES`]) | ruleset slot | first 16 bits of the source → [`prefix_table`] entry |
//! | `PREFIXES_V6_CHUNKS` | `ARRAY_OF_MAPS` of `ARRAY` ([`V6_CHUNK_TABLE_ENTRIES`]) | ruleset slot | chunk × 256 + next 8 bits → [`prefix_table`] entry |
//! | `PREFIXES_V6_SKIPS`  | `ARRAY_OF_MAPS` of `ARRAY` ([`MAX_V6_SKIPS`]) | ruleset slot | skip index → [`PrefixSkip`] |
//! | `PREFIXES_V6_TRIE`   | `ARRAY_OF_MAPS` of `LPM_TRIE`         | ruleset slot             | `Key<[u8; 16]>` → verdict (`u32`); asked only where the table says [`prefix_table::ASK_TRIE`] |
//! | `RATE`               | `ARRAY` ([`RATE_ENTRIES`])            | [`rate_bucket`] of the source | theoretical arrival time (`u64`, ns); then the hash seed and the tick length |
//! | `COUNTERS`           | `PERCPU_ARRAY`                        | [`counter`] index        | [`XdpCounter`] |
//!
//! A *ruleset* is the inner maps of one slot (listener ports, listeners, the prefix
//! tables) and the slot's entry of `RULES`. User space builds every ruleset in
//! fresh maps, stores them (and writes `RULES`) in the slot the program does not use,
//! and switches with one 8-byte store of the control word.
//! The program reads the word once per packet and uses that slot for every lookup,
//! so a packet sees one ruleset whole. The rate table and the counters live outside
//! the slots: a rules change keeps both.
//!
//! Why these shapes (see docs/xdp-cost.md): lookups in `ARRAY` maps, inner ones
//! included, are inlined by the verifier (no call), while a hash or trie lookup is a
//! call and a trie walk is a chain of dependent loads. So the per-packet listener
//! match is one array read indexed by port, and the source prefix match is a walk of
//! array reads in a multibit table (16 bits, then 8 at a time: at most 3 reads for
//! IPv4; for IPv6 one per 8 bits where prefixes branch, a run of bits no prefix
//! branches in being compared at once by a [`PrefixSkip`]); the hash stays for ports
//! with several listener addresses of a family, and an IPv6 trie for the prefixes the
//! IPv6 table has no room for.

/// Ruleset slots. Two are enough: user space only rewrites the slot the program does
/// not use, and only after an RCU grace period has passed since the switch away from
/// it (every packet that could still have read the old word has finished by then).
pub const RULESET_SLOTS: u32 = 2;

/// Most prefixes per address family in one ruleset (deny + allow + the implicit
/// "everything else is not allowed" entry).
pub const MAX_PREFIXES: u32 = 16 * 1024;

/// Most entries in one ruleset's listener table. Every listener takes two: its
/// (address, port) and its (address, port 0) "address only" entry.
pub const MAX_LISTENER_KEYS: u32 = 512;

/// Bits of a source's rate bucket index.
pub const RATE_BUCKET_BITS: u32 = 20;

/// Rate limiter buckets: each source address is hashed (keyed with a random seed) to
/// one of them, and sources that share a bucket share one rate. An array, so the
/// program reads a bucket inline instead of calling a hash table lookup; with
/// 2^20 buckets, 10 000 busy sources share a bucket with another one about 1% of the
/// time. The seed makes it hard to aim a source at another's bucket.
pub const RATE_BUCKETS: u32 = 1 << RATE_BUCKET_BITS;

/// The entry of `RATE` after the buckets that holds the hash seed (a random non-zero
/// `u64` user space writes when it creates the map; kept with the map).
pub const RATE_SEED_INDEX: u32 = RATE_BUCKETS;

/// The entry of `RATE` that holds the length of a kernel tick in nanoseconds
/// (`clock_getres(CLOCK_MONOTONIC_COARSE)`, i.e. 1e9 / `CONFIG_HZ`), which user
/// space writes at every start. The program's clock is `bpf_jiffies64() × tick`: the
/// verifier inlines `bpf_jiffies64`, so time costs no call.
pub const RATE_TICK_NS_INDEX: u32 = RATE_BUCKETS + 1;

/// Entries of `RATE`: the buckets, the seed and the tick length.
pub const RATE_ENTRIES: u32 = RATE_BUCKETS + 2;

/// The rate limiter's hash: the source's words, each mixed in with a multiply, the
/// bucket from the top bits. Shared by the program and the tests.
#[inline(always)]
pub fn rate_bucket(seed: u64, family: u8, addr: [u32; 4]) -> u32 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (seed ^ u64::from(family)).wrapping_mul(K);
    h = (h ^ u64::from(addr[0])).wrapping_mul(K);
    h = (h ^ u64::from(addr[1])).wrapping_mul(K);
    h = (h ^ u64::from(addr[2])).wrapping_mul(K);
    h = (h ^ u64::from(addr[3])).wrapping_mul(K);
    (h >> (64 - RATE_BUCKET_BITS)) as u32
}

/// Entries of a `LISTENER_PORTS` table: one per UDP port (host order index).
pub const LISTENER_PORT_ENTRIES: u32 = 1 << 16;

/// Entries of a `PREFIXES_V4` or `PREFIXES_V6` first-level table: one per value
/// of the source's first 16 bits, plus [`prefix_table::DEFAULT_INDEX`].
pub const PREFIX_FIRST_ENTRIES: u32 = (1 << 16) + 1;

/// Chunks (256 entries each) one IPv4 table holds. A prefix longer than /16 needs a
/// chunk for its /16 (shared by every prefix in that /16), one longer than /24 also a
/// chunk for its /24. A ruleset that needs more is refused.
pub const MAX_V4_CHUNKS: u32 = 4096;

/// Entries of a `PREFIXES_V4_CHUNKS` table.
pub const V4_CHUNK_TABLE_ENTRIES: u32 = MAX_V4_CHUNKS * prefix_table::CHUNK_ENTRIES;

/// Chunks one IPv6 table holds. A chunk is needed only where the prefixes below an
/// entry differ in the next 8 bits (a run where they do not is one [`PrefixSkip`]):
/// 2 048 hold thousands of /48s under a few /32s, or thousands of scattered /128s.
/// Where the table is full, user space marks the entry [`prefix_table::ASK_TRIE`]
/// instead of refusing: the prefixes below it are matched by the `PREFIXES_V6_TRIE`
/// lookup.
pub const MAX_V6_CHUNKS: u32 = 2048;

/// Skips one IPv6 table holds: at most one per chunk entry that leads to exactly one
/// path, so twice the prefixes always fit.
pub const MAX_V6_SKIPS: u32 = 2 * MAX_PREFIXES;

/// Entries of a `PREFIXES_V6_CHUNKS` table.
pub const V6_CHUNK_TABLE_ENTRIES: u32 = MAX_V6_CHUNKS * prefix_table::CHUNK_ENTRIES;

/// Levels of chunks below the first 16 bits of an IPv6 source (8 bits each).
pub const V6_CHUNK_LEVELS: usize = 14;

/// An IPv6 table entry `prefix_table::SKIP | n` sends the walk to skip `n`: the bytes
/// of the source `mask` selects must equal `value`, i.e. the source is on the one
/// path the prefixes below the entry take through them. If they are not, the answer
/// is `otherwise`; if they are, the walk goes on with `next` (a verdict, or a chunk
/// indexed by byte `resume` of the source). So a run of bits in which no prefix
/// branches (a /128 alone under its /32, say) costs one read and a compare instead
/// of one chunk read per 8 bits.
///
/// `mask` and `value` are the 16 address bytes as four `u32` read in place from the
/// packet (wire order), as the program compares them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixSkip {
    pub mask: [u32; 4],
    pub value: [u32; 4],
    pub otherwise: u32,
    pub next: u32,
    pub resume: u32,
    pub _pad: u32,
}

/// The source prefix tables: a multibit trie made of arrays, one per family (16-8-8
/// for IPv4, 16 then fourteen 8-bit levels for IPv6).
///
/// Every entry is a `u32`: `0` = no prefix longer than /0 covers these addresses (the
/// program then reads [`DEFAULT_INDEX`], the /0 entry's verdict or 0), one of the
/// `VERDICT_*` values (the verdict of the longest prefix covering them), [`CHUNK`]
/// `| n`: look the next 8 bits of the source up in chunk `n` of the family's chunk
/// table (entries `n * 256 ..`), and in IPv6 tables only [`SKIP`] `| n` (compare a
/// run of the source's bits at once, see [`super::PrefixSkip`]) or [`ASK_TRIE`]: the
/// table had no room for the prefixes below this entry, the trie holding every IPv6
/// prefix answers.
/// User space expands the prefixes into the entries, longest last, so an entry
/// always holds the longest match, as a trie lookup would.
pub mod prefix_table {
    /// The first-level entry holding the /0 prefix's verdict (0 if there is none).
    pub const DEFAULT_INDEX: u32 = 1 << 16;
    /// Entries per chunk (8 bits).
    pub const CHUNK_ENTRIES: u32 = 256;
    /// Marks an entry that points to a chunk.
    pub const CHUNK: u32 = 1 << 31;
    /// An entry whose longest match only the trie knows.
    pub const ASK_TRIE: u32 = 1 << 30;
    /// Marks an entry that points to a `PrefixSkip`.
    pub const SKIP: u32 = 1 << 29;
}

/// Bumped by hand when a map's *meaning* changes without its sizes changing. User
/// space hashes it with every map definition into the layout fingerprint it stores in
/// the control word: pinned maps from a build with another layout are never reused.
pub const LAYOUT_VERSION: u8 = 2;

/// Map names, as the eBPF object declares them.
pub mod map_names {
    pub const CONTROL: &str = "CONTROL";
    pub const LISTENER_PORTS: &str = "LISTENER_PORTS";
    pub const RULES: &str = "RULES";
    pub const LISTENERS: &str = "LISTENERS";
    pub const PREFIXES_V4: &str = "PREFIXES_V4";
    pub const PREFIXES_V4_CHUNKS: &str = "PREFIXES_V4_CHUNKS";
    pub const PREFIXES_V6: &str = "PREFIXES_V6";
    pub const PREFIXES_V6_CHUNKS: &str = "PREFIXES_V6_CHUNKS";
    pub const PREFIXES_V6_SKIPS: &str = "PREFIXES_V6_SKIPS";
    pub const PREFIXES_V6_TRIE: &str = "PREFIXES_V6_TRIE";
    pub const RATE: &str = "RATE";
    pub const COUNTERS: &str = "COUNTERS";

    /// (map name, pin name) of every map, in one place for loading and checking.
    pub const ALL: [(&str, &str); 12] = [
        (CONTROL, super::pin_names::CONTROL),
        (LISTENER_PORTS, super::pin_names::LISTENER_PORTS),
        (RULES, super::pin_names::RULES),
        (LISTENERS, super::pin_names::LISTENERS),
        (PREFIXES_V4, super::pin_names::PREFIXES_V4),
        (PREFIXES_V4_CHUNKS, super::pin_names::PREFIXES_V4_CHUNKS),
        (PREFIXES_V6, super::pin_names::PREFIXES_V6),
        (PREFIXES_V6_CHUNKS, super::pin_names::PREFIXES_V6_CHUNKS),
        (PREFIXES_V6_SKIPS, super::pin_names::PREFIXES_V6_SKIPS),
        (PREFIXES_V6_TRIE, super::pin_names::PREFIXES_V6_TRIE),
        (RATE, super::pin_names::RATE),
        (COUNTERS, super::pin_names::COUNTERS),
    ];
}

/// Program names, as the eBPF object declares them.
pub mod program_names {
    pub const FILTER: &str = "xdp_filter";
}

/// Pin names inside `<bpffs>/<service>/xdp/<ifname>/`.
pub mod pin_names {
    /// The `bpf_link` that attaches the program to the interface. While this pin
    /// exists the filter stays attached, with or without a supervisor.
    pub const LINK: &str = "link";
    /// The program the link runs (for inspection; the link keeps it alive anyway).
    pub const PROGRAM: &str = "program";
    pub const CONTROL: &str = "control";
    pub const LISTENER_PORTS: &str = "listener-ports";
    pub const RULES: &str = "rules";
    pub const LISTENERS: &str = "listeners";
    pub const PREFIXES_V4: &str = "prefixes-v4";
    pub const PREFIXES_V4_CHUNKS: &str = "prefixes-v4-chunks";
    pub const PREFIXES_V6: &str = "prefixes-v6";
    pub const PREFIXES_V6_CHUNKS: &str = "prefixes-v6-chunks";
    pub const PREFIXES_V6_SKIPS: &str = "prefixes-v6-skips";
    pub const PREFIXES_V6_TRIE: &str = "prefixes-v6-trie";
    pub const RATE: &str = "rate";
    pub const COUNTERS: &str = "counters";
    /// The directory below `<bpffs>/<service>/` holding one directory per interface.
    pub const XDP_DIR: &str = "xdp";
}

/// Which ruleset the program uses, as one 8-byte word (same idea as the selector's
/// `Control`): one aligned store on the user-space side, one load in the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RulesetControl {
    /// Slot of the ruleset maps (and of `RULES`) in use.
    pub slot: u8,
    /// 1 once a ruleset is installed. Until then the program passes everything.
    pub armed: u8,
    /// Fingerprint of the map layouts of the build that wrote the word (user space
    /// only; the program ignores it). A restarted supervisor reuses pinned maps only
    /// when it matches its own.
    pub layout: u16,
    /// Ruleset generation, for status only.
    pub generation: u32,
}

impl RulesetControl {
    pub const NONE: RulesetControl = RulesetControl {
        slot: 0,
        armed: 0,
        layout: 0,
        generation: 0,
    };

    /// Packs the fields with shifts, so the word means the same on either endianness.
    #[inline(always)]
    pub const fn to_word(self) -> u64 {
        (self.slot as u64)
            | ((self.armed as u64) << 8)
            | ((self.layout as u64) << 16)
            | ((self.generation as u64) << 32)
    }

    #[inline(always)]
    pub const fn from_word(word: u64) -> RulesetControl {
        RulesetControl {
            slot: word as u8,
            armed: (word >> 8) as u8,
            layout: (word >> 16) as u16,
            generation: (word >> 32) as u32,
        }
    }
}

/// Address families as they appear in [`ListenerKey::family`] and [`rate_bucket`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A listener's destination: (address, port), both as on the wire.
///
/// IPv4 addresses fill the first four bytes of `addr`, the rest is zero; `family`
/// keeps an IPv4 key apart from an IPv6 address that happens to share its bytes.
/// The unspecified address (`0.0.0.0`, `::`) is the wildcard: the program tries the
/// packet's exact destination first, then the wildcard of its family.
///
/// Every listener also has an entry with `port == [0, 0]`: "this address has a
/// listener". The program uses it for UDP packets whose port it cannot read
/// (truncated headers): those are malformed and addressed to the service, so they
/// are the service's to drop. Port 0 is never a listener's port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub addr: [u8; 16],
    /// Big-endian, as in the UDP header.
    pub port: [u8; 2],
    pub family: u8,
    /// Always zero: hash keys are compared bytewise.
    pub _pad: u8,
}

/// What the listeners on one destination port are, per family: one `LISTENER_PORTS`
/// entry. The program matches a datagram's destination with this one array read:
/// a wildcard listener of the family takes any address, a single address is
/// compared here, and only several addresses of one family on one port send it to
/// the `LISTENERS` hash (exact address). Port 0's entry describes every listener
/// address whatever its port: the "address only" match of `ListenerKey`.
/// A match's rule is the slot's `RULES` entry (one rule per ruleset).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerPort {
    /// `PORT_*` bits.
    pub flags: u32,
    /// The IPv4 address with [`PORT_V4_ONE`], as on the wire.
    pub v4: [u8; 4],
    /// The IPv6 address with [`PORT_V6_ONE`].
    pub v6: [u8; 16],
}

/// `ListenerPort::flags`: a wildcard IPv4 listener (`0.0.0.0`) on this port.
pub const PORT_V4_ANY: u32 = 1;
/// `ListenerPort::flags`: exactly one IPv4 listener address, in `v4`.
pub const PORT_V4_ONE: u32 = 2;
/// `ListenerPort::flags`: several IPv4 listener addresses: ask `LISTENERS`.
pub const PORT_V4_MANY: u32 = 4;
/// `ListenerPort::flags`: a wildcard IPv6 listener (`::`) on this port.
pub const PORT_V6_ANY: u32 = 8;
/// `ListenerPort::flags`: exactly one IPv6 listener address, in `v6`.
pub const PORT_V6_ONE: u32 = 16;
/// `ListenerPort::flags`: several IPv6 listener addresses: ask `LISTENERS`.
pub const PORT_V6_MANY: u32 = 32;

/// `ListenerRule::flags`: drop malformed datagrams.
pub const RULE_DROP_MALFORMED: u32 = 1;
/// `ListenerRule::flags`: apply the per-source rate limit.
pub const RULE_RATE_LIMIT: u32 = 2;

/// What the program does with a listener's traffic. Stored per listener, so the
/// parameters come with the lookup the program needs anyway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerRule {
    /// `RULE_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// Rate limit: nanoseconds between datagrams at the sustained rate (GCRA's
    /// emission interval, `1e9 / packets_per_second`).
    pub interval_ns: u64,
    /// Rate limit: how far a source's theoretical arrival time may run ahead of now,
    /// `(burst - 1) * interval_ns`: a source may send `burst` datagrams at once.
    pub tolerance_ns: u64,
}

/// Values of the prefix tables: what the longest matching source prefix says.
///
/// User space resolves deny/allow overlaps before it fills the tables, so one
/// longest-prefix match answers (a [`prefix_table`] walk): deny prefixes are
/// stored as [`VERDICT_DENY`]; allow prefixes not inside
/// any deny prefix as [`VERDICT_ALLOW`]; and when the allow list is not empty, a
/// `/0` entry says [`VERDICT_NOT_ALLOWED`] for everything else. No match = pass.
pub const VERDICT_DENY: u32 = 1;
pub const VERDICT_ALLOW: u32 = 2;
pub const VERDICT_NOT_ALLOWED: u32 = 3;

/// Indices of `COUNTERS`: one per verdict and reason.
pub mod counter {
    /// Service traffic that passed every rule.
    pub const PASSED: u32 = 0;
    /// Dropped: the source is in a deny prefix.
    pub const DENIED: u32 = 1;
    /// Dropped: the allow list is not empty and the source is not in it.
    pub const NOT_ALLOWED: u32 = 2;
    /// Dropped: the source exceeded its rate.
    pub const RATE_LIMITED: u32 = 3;
    /// Dropped: truncated headers or a UDP length that disagrees with the packet.
    pub const MALFORMED: u32 = 4;
    /// Passed untouched: not UDP to one of the service's listeners.
    pub const NOT_OURS: u32 = 5;
    /// Passed untouched: a non-first IP fragment (it has no UDP header; the first
    /// fragment carries the verdict, see the program's documentation).
    pub const FRAGMENT: u32 = 6;
    /// Entries in `COUNTERS`.
    pub const COUNT: u32 = 7;
}

/// Per-CPU packets and bytes for one [`counter`] index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all five): plain old data: #[repr(C)], integer and byte-array fields
    // only, explicit padding fields, any bit pattern is valid.
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::ListenerPort {}
    unsafe impl aya::Pod for super::ListenerRule {}
    unsafe impl aya::Pod for super::XdpCounter {}
    unsafe impl aya::Pod for super::PrefixSkip {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_word_round_trips() {
        let control = RulesetControl {
            slot: 1,
            armed: 1,
            layout: 0xbeef,
            generation: 0xdead_beef,
        };
        assert_eq!(RulesetControl::from_word(control.to_word()), control);
        assert_eq!(RulesetControl::from_word(0), RulesetControl::NONE);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ListenerKey>(), 20);
        assert_eq!(core::mem::size_of::<ListenerPort>(), 24);
        assert_eq!(core::mem::size_of::<ListenerRule>(), 24);
        assert_eq!(core::mem::size_of::<XdpCounter>(), 16);
    }
}
