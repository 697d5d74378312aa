//! The maps contract between the kernel side (`supervisor-ebpf`) and user space
//! (`supervisor`).
//!
//! Everything the two sides exchange through eBPF maps is defined here, once: map
//! names, sizes, key layouts and the `#[repr(C)]` values. Both crates compile this
//! file, so a layout change is a compile-time change on both sides at once.
//!
//! Per listener, the selector program owns these maps (pinned under
//! `<bpffs>/<service>/<listener>/`):
//!
//! | map            | type                                   | key                         | value                 |
//! |----------------|----------------------------------------|-----------------------------|-----------------------|
//! | `CONTROL`      | `ARRAY` (8 entries, mmapable)          | [`control_index`]           | `u64` words           |
//! | `GENERATIONS`  | `ARRAY_OF_MAPS` of `REUSEPORT_SOCKARRAY` | generation slot            | one generation's sockets |
//! | `COUNTERS`     | `PERCPU_ARRAY`                         | [`counter_index`]           | [`SocketCounters`]    |
//! | `FLOWS`        | `LRU_HASH` (`flow_table_size` entries) | [`FlowKey`]                 | [`FlowEntry`]         |
//! | `FLOW_COUNTERS`| `PERCPU_ARRAY` (1 entry)               | `0`                         | [`FlowCounters`]      |
//! | `PROBES`       | `HASH`                                 | probe source port           | [`ProbeTarget`]       |
//! | `RANDOM_STATE` | `PERCPU_ARRAY` (1 entry), not pinned   | `0`                         | `u64` generator state |
//! | `FLOW_CACHE`   | `PERCPU_ARRAY` ([`FLOW_CACHE_ENTRIES`]), not pinned | low bits of the kernel's 4-tuple hash | the program's own copy of a `FLOWS` entry |
//! | `FLOW_INSERTS` | `ARRAY` (1 entry), not pinned          | `0`                         | `u64` flows recorded, for the cache's pressure check |
//! | `FLOW_PRESSURE`| `PERCPU_ARRAY` (1 entry), not pinned   | `0`                         | this CPU's view of how fast `FLOWS` turns over |
//!
//! A generation's `REUSEPORT_SOCKARRAY` is created fresh by user space for every
//! generation, filled, pinned as `gen-<N>`, and stored in slot `N % GENERATION_SLOTS`
//! of `GENERATIONS` before the flip.
#![cfg_attr(not(test), no_std)]

/// Most sockets one generation of one listener can have (`workers * sockets_per_worker`).
pub const MAX_SOCKETS: u32 = 64;

/// Generation slots in `GENERATIONS`. At most three generations are alive at once
/// (the one draining, the one serving, the one being built), so four slots let a
/// slot be reused only after the generation that held it is gone.
pub const GENERATION_SLOTS: u32 = 4;

/// Map names, as the eBPF object declares them.
pub mod map_names {
    pub const CONTROL: &str = "CONTROL";
    pub const GENERATIONS: &str = "GENERATIONS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_COUNTERS: &str = "FLOW_COUNTERS";
    pub const PROBES: &str = "PROBES";
    /// The `random` mode's per-CPU generator state; private to the program (not
    /// pinned, never read by user space).
    pub const RANDOM_STATE: &str = "RANDOM_STATE";
    /// The `flow` mode's per-CPU front cache of `FLOWS` and what decides whether it
    /// may be used; private to the program (not pinned, never read by user space).
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    pub const FLOW_INSERTS: &str = "FLOW_INSERTS";
    pub const FLOW_PRESSURE: &str = "FLOW_PRESSURE";
    /// The program's read-only globals (`.rodata`), set when it is loaded.
    pub const FLOW_TABLE_SIZE_GLOBAL: &str = "FLOW_TABLE_SIZE";
}

/// Program names, as the eBPF object declares them.
pub mod program_names {
    pub const SELECTOR: &str = "select_socket";
}

/// How the selector spreads datagrams over the working generation's sockets.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalanceMode {
    /// A fresh random socket for every datagram: even spread even when a single
    /// sender (one 4-tuple) sends everything.
    Random = 0,
    /// The kernel's 4-tuple hash mapped onto the socket count (multiply and shift):
    /// one flow stays on one socket while the generation serves.
    Hash = 1,
    /// Sticky across generations: a flow (remote address and port) keeps the
    /// socket, and so the generation, it started on until it has been idle for
    /// `flow_idle`; new flows go to the working generation (spread at random).
    Flow = 2,
    /// The datagram names its socket: a 16-bit [`cookie`] at a configured offset
    /// of the UDP payload, handed to the worker that owns the socket. Datagrams
    /// without a valid cookie are new flows. No table, nothing to overflow.
    Cookie = 3,
}

impl BalanceMode {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Random),
            1 => Some(Self::Hash),
            2 => Some(Self::Flow),
            3 => Some(Self::Cookie),
            _ => None,
        }
    }

    /// Modes in which an old generation keeps receiving after the flip.
    pub const fn has_affinity(self) -> bool {
        matches!(self, Self::Flow | Self::Cookie)
    }
}

/// Entries of the `CONTROL` array.
pub mod control_index {
    /// The [`Control`](super::Control) word: the only entry whose change switches
    /// traffic, written with one 8-byte store.
    pub const WORD: u32 = 0;
    /// `SLOT_GENERATION + slot`: the generation number whose socket array is in
    /// that slot of `GENERATIONS` (0: empty). A flow entry or cookie naming a
    /// generation that no longer owns its slot is stale, even if the slot was
    /// reused and has a socket at the same index.
    pub const SLOT_GENERATION: u32 = 1;
    /// `SLOT_SETTINGS + slot`: the [`Settings`](super::Settings) of the generation
    /// in that slot. The selector reads those of the working slot, so a new
    /// generation's settings are written with its socket array, before the flip,
    /// and take effect with the control word's one store: the generation that
    /// serves until then never runs with another generation's settings.
    pub const SLOT_SETTINGS: u32 = SLOT_GENERATION + super::GENERATION_SLOTS;
    /// Milliseconds of `CLOCK_MONOTONIC_COARSE`, stored by the supervisor every
    /// [`CLOCK_TICK_MS`](super::CLOCK_TICK_MS). The flow table's idle clock: one
    /// array read is several times cheaper per datagram than a time helper. 0 (no
    /// supervisor ticking) makes the selector read the kernel's clock instead.
    pub const CLOCK_MS: u32 = SLOT_SETTINGS + super::GENERATION_SLOTS;
    /// Non-zero while readiness probes are under way (`ready = "probe"`): only
    /// then does the selector look datagrams up in `PROBES`.
    pub const PROBE_ACTIVE: u32 = CLOCK_MS + 1;
    pub const ENTRIES: u32 = PROBE_ACTIVE + 1;
}

/// Parameters of the flow and cookie modes, one `u64` word per generation slot in
/// `CONTROL` (`control_index::SLOT_SETTINGS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// A flow idle this long goes to the working generation on its next datagram.
    pub flow_idle_ms: u32,
    /// Offset of the 16-bit big-endian cookie in the UDP payload.
    pub cookie_offset: u16,
}

impl Settings {
    #[inline(always)]
    pub const fn to_word(self) -> u64 {
        (self.flow_idle_ms as u64) | ((self.cookie_offset as u64) << 32)
    }

    #[inline(always)]
    pub const fn from_word(word: u64) -> Settings {
        Settings {
            flow_idle_ms: word as u32,
            cookie_offset: (word >> 32) as u16,
        }
    }
}

/// The cookie of socket `socket` of generation `generation`: the generation's low
/// byte, then the socket index. The slot follows from the generation
/// (`generation % GENERATION_SLOTS`, which divides 256), and `SLOT_GENERATION`
/// tells whether that generation still owns it.
#[inline(always)]
pub const fn cookie(generation: u32, socket: u32) -> u16 {
    (((generation & 0xff) as u16) << 8) | (socket & 0xff) as u16
}

/// The (generation low byte, socket index) a cookie names.
#[inline(always)]
pub const fn parse_cookie(cookie: u16) -> (u8, u8) {
    ((cookie >> 8) as u8, cookie as u8)
}

/// Key of the flow table: the remote address and port, as they are in the packet
/// (network byte order). IPv4 uses `addr[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub addr: [u32; 4],
    pub port: u16,
    /// 4 or 6.
    pub family: u16,
}

/// Where a flow goes and when it was last seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// `CONTROL[CLOCK_MS]` at the last refresh. Refreshed at most every
    /// `flow_idle / 4`, so a busy flow does not write its entry on every datagram.
    pub last_seen_ms: u64,
    pub generation: u32,
    pub socket: u16,
    pub slot: u8,
    pub _pad: u8,
}

/// How often the supervisor advances `CONTROL[CLOCK_MS]`; flow idle times are
/// measured at this resolution.
pub const CLOCK_TICK_MS: u64 = 10;

/// Where a readiness probe goes. `PROBES` maps the UDP source port of one of the
/// supervisor's probe sockets (network byte order, as in the packet) to this; the
/// source address must match too, so a remote client that happens to use the
/// same port is not steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The probe socket's address (IPv4 in `addr[0]`), network byte order.
    pub addr: [u32; 4],
    /// 4 or 6.
    pub family: u8,
    pub slot: u8,
    pub socket: u16,
}

/// Probes that can be under way at once (one per worker of a generation).
pub const MAX_PROBES: u32 = MAX_SOCKETS;

/// Default `flow_table_size`.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65536;

/// Entries of the `flow` mode's per-CPU front cache (a power of two: the index is
/// the low bits of the kernel's 4-tuple hash). 4096 entries of 32 bytes: 128 KiB
/// per CPU.
pub const FLOW_CACHE_ENTRIES: u32 = 4096;

/// How long a CPU answers a flow from its cache before it looks the flow table up
/// again, in kernel ticks (`jiffies`: 12 ms at 250 Hz, 3 ms at 1000 Hz). Ticks and
/// not the supervisor's clock word, which stands still while no supervisor runs.
pub const FLOW_CACHE_TRUST_JIFFIES: u64 = 3;

/// The cache is used only while the table is calm: a CPU that sees more than
/// `flow_table_size / FLOW_PRESSURE_DIVISOR` flows recorded (by all CPUs) within
/// one `FLOW_CACHE_TRUST_JIFFIES` window looks the table up on every datagram
/// until a window passes calmly again.
///
/// The table is an LRU: what keeps a busy flow's entry from being evicted by a
/// flood of new flows is being looked up. A flow answered from a cache is looked up
/// once per window; below this rate of new flows the table takes at least this
/// many windows to turn over, so that is recent enough.
pub const FLOW_PRESSURE_DIVISOR: u32 = 16;

/// Per-CPU counters of the flow and cookie stages' slow paths. (Hits, the fast
/// path, are `SocketCounters::affinity_hits`.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Flows seen for the first time (or again after expiring) and recorded.
    pub new_flows: u64,
    /// Of `new_flows`, those whose key was not in the table (the others replaced
    /// their own expired entry). Nothing else ever removes an entry but the LRU,
    /// so `first_seen - entries in the table` is the number of evictions.
    pub first_seen: u64,
    /// Known flows whose socket (or generation) was gone: sent to the working generation.
    pub socket_gone: u64,
    /// Known flows idle longer than `flow_idle`: sent to the working generation.
    pub expired: u64,
    /// Datagrams too short for a cookie, or whose cookie named no live socket.
    pub cookie_invalid: u64,
    /// Flows that could not be recorded (the table refused the insert).
    pub insert_failed: u64,
}

/// The selector's view of which generation serves.
///
/// It travels as one little `u64` word ([`Control::to_word`]) so the flip from one
/// generation to the next is a single aligned 8-byte store on the user-space side
/// (through an mmap of the `CONTROL` map) and a single 8-byte load on the program
/// side: a datagram sees either the old generation whole or the new one whole,
/// never a slot of one with the socket count of the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// Slot in `GENERATIONS` whose socket array receives new datagrams.
    pub working_slot: u8,
    /// [`BalanceMode`] as its `u8`.
    pub balance_mode: u8,
    /// Sockets filled in that slot's array, indices `0..socket_count`. Zero means
    /// "no generation serves": the program leaves the choice to the kernel.
    pub socket_count: u16,
    /// Generation number, for counters and debugging only.
    pub generation: u32,
}

impl Control {
    /// No generation serves yet: every datagram gets the kernel's own choice.
    pub const NONE: Control = Control {
        working_slot: 0,
        balance_mode: BalanceMode::Random as u8,
        socket_count: 0,
        generation: 0,
    };

    /// Packs the fields with shifts, so the word means the same on either endianness.
    #[inline(always)]
    pub const fn to_word(self) -> u64 {
        (self.working_slot as u64)
            | ((self.balance_mode as u64) << 8)
            | ((self.socket_count as u64) << 16)
            | ((self.generation as u64) << 32)
    }

    #[inline(always)]
    pub const fn from_word(word: u64) -> Control {
        Control {
            working_slot: word as u8,
            balance_mode: (word >> 8) as u8,
            socket_count: (word >> 16) as u16,
            generation: (word >> 32) as u32,
        }
    }
}

/// Per-CPU counters for one socket of one generation slot.
///
/// `selected`: datagrams the selector steered to this socket.
/// `errors`: the selector chose this socket but the kernel refused it (the socket
/// had left the group); the datagram then got the kernel's own choice.
/// `fallback`: counted on socket 0 of a slot only: datagrams for which the slot had
/// no socket array, so the kernel chose.
/// `affinity_hits`: of `selected`, the datagrams of a known flow (`flow`) or with a
/// valid cookie (`cookie`). Counted here, in the entry the selector writes
/// anyway, so the hit path costs no second counter update.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounters {
    pub selected: u64,
    pub fallback: u64,
    pub errors: u64,
    pub affinity_hits: u64,
}

/// Index of (slot, socket) in `COUNTERS`.
#[inline(always)]
pub const fn counter_index(slot: u32, socket: u32) -> u32 {
    slot * MAX_SOCKETS + socket
}

/// Entries in `COUNTERS`.
pub const COUNTER_ENTRIES: u32 = GENERATION_SLOTS * MAX_SOCKETS;

/// Pin names inside `<bpffs>/<service>/<listener>/`.
pub mod pin_names {
    pub const SELECTOR: &str = "selector";
    pub const CONTROL: &str = "control";
    pub const GENERATIONS: &str = "generations";
    pub const COUNTERS: &str = "counters";
    pub const FLOWS: &str = "flows";
    pub const FLOW_COUNTERS: &str = "flow_counters";
    pub const PROBES: &str = "probes";
    /// Prefix of a generation's socket array: `gen-<N>`.
    pub const GENERATION_PREFIX: &str = "gen-";
}

/// [`FlowCounters`] for user space's reports (serde, without the `no_std` constraints).
#[cfg(feature = "user")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowCountersOut {
    pub hits: u64,
    pub new_flows: u64,
    pub socket_gone: u64,
    pub expired: u64,
    pub cookie_hits: u64,
    pub cookie_invalid: u64,
    pub insert_failed: u64,
    /// Entries the LRU table evicted to make room for new flows.
    #[serde(default)]
    pub evictions: u64,
}

#[cfg(feature = "user")]
impl FlowCountersOut {
    /// `affinity_hits`: the sum of [`SocketCounters::affinity_hits`] over the live
    /// generations, reported as flow or cookie hits depending on `mode`;
    /// `table_entries`: entries now in the flow table.
    pub fn new(c: FlowCounters, affinity_hits: u64, mode: BalanceMode, table_entries: u64) -> Self {
        let (hits, cookie_hits) = match mode {
            BalanceMode::Cookie => (0, affinity_hits),
            _ => (affinity_hits, 0),
        };
        FlowCountersOut {
            hits,
            new_flows: c.new_flows,
            socket_gone: c.socket_gone,
            expired: c.expired,
            cookie_hits,
            cookie_invalid: c.cookie_invalid,
            insert_failed: c.insert_failed,
            evictions: c.first_seen.saturating_sub(table_entries),
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data: #[repr(C)], only u64 fields, no padding, any bit
    // pattern is valid.
    unsafe impl aya::Pod for super::SocketCounters {}
    // SAFETY: as above; FlowKey has no padding (16 + 2 + 2 bytes), FlowEntry's
    // padding byte is an explicit field.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowEntry {}
    unsafe impl aya::Pod for super::FlowCounters {}
    // SAFETY: 16 + 1 + 1 + 2 bytes, no padding.
    unsafe impl aya::Pod for super::ProbeTarget {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_word_round_trips() {
        let control = Control {
            working_slot: 3,
            balance_mode: BalanceMode::Hash as u8,
            socket_count: 64,
            generation: 0xdead_beef,
        };
        assert_eq!(Control::from_word(control.to_word()), control);
        assert_eq!(Control::from_word(0), Control::NONE);
    }

    #[test]
    fn cookies_name_generation_and_socket() {
        let c = cookie(258, 5);
        assert_eq!(parse_cookie(c), (2, 5));
        // The slot is recoverable from the generation's low byte.
        assert_eq!(
            (parse_cookie(c).0 as u32) % GENERATION_SLOTS,
            258 % GENERATION_SLOTS
        );
        let s = Settings {
            flow_idle_ms: 30_000,
            cookie_offset: 1,
        };
        assert_eq!(Settings::from_word(s.to_word()), s);
    }

    #[test]
    fn counter_indices_do_not_overlap() {
        assert_eq!(counter_index(1, 0), MAX_SOCKETS);
        assert_eq!(
            counter_index(GENERATION_SLOTS - 1, MAX_SOCKETS - 1),
            COUNTER_ENTRIES - 1
        );
    }
}

/// The XDP filter's maps contract.
pub mod xdp;
