//! The `SK_REUSEPORT` selector: picks, for every datagram that reaches a
//! listener's reuseport group, one socket of a live generation.
//!
//! The whole decision rests on one 8-byte control word (see
//! `supervisor_common::Control`): user space flips generations by storing a new
//! word, so a datagram sees either the old generation or the new one, whole.
//! Any miss (no generation yet, slot empty, socket gone) returns `SK_PASS`
//! without a selection, which makes the kernel choose by its own hash: the
//! selector never drops a datagram.
//!
//! Modes:
//! - `random`: a fresh random socket of the working generation per datagram.
//! - `hash`: the kernel's 4-tuple hash modulo the working generation's sockets.
//! - `flow`: the LRU table `FLOWS` keeps each remote (address, port) on the socket
//!   it started on, across generations, until it has been idle for `flow_idle`. A
//!   per-CPU front cache (`FLOW_CACHE`) answers a busy flow's datagrams without the
//!   table while the table is calm.
//! - `cookie`: the datagram carries the cookie of its socket in its payload.
#![no_std]
#![no_main]
// One atomic add (`atomic_add`): Rust's `AtomicU64::fetch_add` does not exist on the
// BPF target (it has no compare-and-swap), the instruction itself does.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_MMAPABLE, bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS},
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray, ReusePortSockArray},
    helpers::{
        bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_skb_load_bytes,
        bpf_skb_load_bytes_relative,
    },
    macros::{btf_map, sk_reuseport},
    programs::SkReuseportContext,
};
use core::mem::MaybeUninit;

use supervisor_common::{
    BalanceMode, COUNTER_ENTRIES, Control, DEFAULT_FLOW_TABLE_SIZE, FLOW_CACHE_ENTRIES,
    FLOW_CACHE_TRUST_JIFFIES, FLOW_PRESSURE_DIVISOR, FlowCounters, FlowEntry, FlowKey,
    GENERATION_SLOTS, MAX_PROBES, MAX_SOCKETS, ProbeTarget, Settings, SocketCounters,
    control_index, counter_index, parse_cookie,
};

#[btf_map]
static CONTROL: Array<u64, { control_index::ENTRIES as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

#[btf_map]
static GENERATIONS: ArrayOfMaps<
    ReusePortSockArray<{ MAX_SOCKETS as usize }>,
    { GENERATION_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static COUNTERS: PerCpuArray<SocketCounters, { COUNTER_ENTRIES as usize }> = PerCpuArray::new();

/// Sized by user space at load time (`flow_table_size`).
#[btf_map]
static FLOWS: LruHashMap<FlowKey, FlowEntry, { DEFAULT_FLOW_TABLE_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
static FLOW_COUNTERS: PerCpuArray<FlowCounters, 1> = PerCpuArray::new();

/// Per-CPU state of the `random` mode's generator (xorshift64). Not pinned and not
/// read by user space: it lives as long as the program that holds it.
#[btf_map]
static RANDOM_STATE: PerCpuArray<u64, 1> = PerCpuArray::new();

/// This CPU's copy of the `FLOWS` entries of the flows it saw last, one per
/// `hash & (FLOW_CACHE_ENTRIES - 1)` (the kernel's 4-tuple hash): a hit costs an
/// array read instead of copying the address out of the IP header and a
/// hash-table lookup. Not pinned and not read by user space: it lives as long as
/// the program.
#[btf_map]
static FLOW_CACHE: PerCpuArray<CachedFlow, { FLOW_CACHE_ENTRIES as usize }> = PerCpuArray::new();

/// Flows recorded in `FLOWS` by every CPU since the program was loaded (one atomic
/// add per new flow, which already pays for a table insert).
#[btf_map]
static FLOW_INSERTS: Array<u64, 1> = Array::new();

/// Whether this CPU may use its cache (see `table_calm`).
#[btf_map]
static FLOW_PRESSURE: PerCpuArray<FlowPressure, 1> = PerCpuArray::new();

/// `flow_table_size`, set by user space when it loads the program (a read-only
/// global): what the pressure check compares the rate of new flows with.
#[unsafe(no_mangle)]
static FLOW_TABLE_SIZE: u32 = DEFAULT_FLOW_TABLE_SIZE;

/// A `FLOWS` entry as this CPU last read or wrote it, with the datagram's identity.
///
/// Trusted for `FLOW_CACHE_TRUST_JIFFIES` ticks after that, only while the table's
/// entry is not due for its refresh (`last_seen_ms` younger than `flow_idle / 4`)
/// and only while the table is calm. Then the slow path looks the table up
/// again: that lookup keeps the entry recent in the LRU, picks up what another CPU
/// changed, and refreshes the entry and this copy when due. A socket or generation
/// that went away is caught by the same checks the table's entries get.
///
/// The copy is matched by the kernel's 4-tuple hash and the remote port (read in
/// place), not by the address (which only a helper call can copy out): two remote
/// endpoints with the same port whose 4-tuples hash alike (about one pair in
/// 4 * 10^9) could be taken for each other for one window, and then each goes to
/// the other's socket, which is alive.
#[repr(C)]
#[derive(Clone, Copy)]
struct CachedFlow {
    /// `cache_key`; 0 (an empty entry) matches nothing: the family is 4 or 6.
    key: u64,
    /// `bpf_jiffies64` when this CPU last read the table's entry.
    read_jiffies: u64,
    /// The table entry's `last_seen_ms` when this copy was made.
    last_seen_ms: u64,
    generation: u32,
    socket: u16,
    slot: u8,
    _pad: u8,
}

/// This CPU's measure of the rate of new flows, one window at a time.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlowPressure {
    /// `bpf_jiffies64` at the start of the current window.
    window_start: u64,
    /// `FLOW_INSERTS` then.
    inserts_at_start: u64,
    /// Non-zero: the last window saw too many new flows; the cache is not used.
    busy: u64,
}

/// Readiness probes under way: probe socket's source port -> target socket.
#[btf_map]
static PROBES: HashMap<u16, ProbeTarget, { MAX_PROBES as usize }> = HashMap::new();

/// `ETH_P_IP` / `ETH_P_IPV6` as `sk_reuseport_md.eth_protocol` holds them
/// (network byte order in a host-order u32).
const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const UDP_HEADER_LEN: u32 = 8;
/// Cookies this far into the datagram (a power of two) are read in place.
const DIRECT_COOKIE_LIMIT: u32 = 1 << 12;

#[sk_reuseport]
pub fn select_socket(ctx: SkReuseportContext) -> u32 {
    select(&ctx);
    // SK_PASS with a selection delivers to the selected socket; without one the
    // kernel picks. SK_DROP is never returned.
    SK_PASS
}

#[inline(always)]
fn word(index: u32) -> u64 {
    match CONTROL.get_ptr(index) {
        // One 8-byte load: user space writes each word with one 8-byte store.
        // SAFETY: the pointer comes from a successful lookup in the array.
        Some(word) => unsafe { core::ptr::read_volatile(word) },
        None => 0,
    }
}

#[inline(always)]
fn select(ctx: &SkReuseportContext) {
    // Before anything else, and even before the first generation serves: a probe
    // must reach the (not yet working) socket it tests.
    if word(control_index::PROBE_ACTIVE) != 0 && steer_probe(ctx) {
        return;
    }
    let control = Control::from_word(word(control_index::WORD));
    let sockets = control.socket_count as u32;
    if sockets == 0 {
        return;
    }
    // The test build `selector-variant` (see supervisor/Cargo.toml) differs from
    // the real one by this bound, which never holds (user space stores at most
    // MAX_SOCKETS): another program, for the tests of a selector change.
    #[cfg(feature = "variant")]
    if sockets > MAX_SOCKETS {
        return;
    }
    let slot = control.working_slot as u32 % GENERATION_SLOTS;
    match BalanceMode::from_u8(control.balance_mode) {
        Some(BalanceMode::Hash) => {
            // The kernel's 4-tuple hash is uniform over 32 bits: a multiply and a
            // shift map it onto the sockets as evenly as `%` would, without a division.
            select_in(ctx, slot, scale(ctx.hash(), sockets), false);
        }
        Some(BalanceMode::Flow) => select_flow(ctx, &control, slot),
        Some(BalanceMode::Cookie) => select_cookie(ctx, slot, sockets),
        // Random, and any mode this build does not know: spread evenly.
        _ => {
            select_in(ctx, slot, random_below(sockets), false);
        }
    }
}

/// Selects socket `index` of the generation in `slot`; false if the kernel refused.
/// `affinity_hit`: the datagram belongs to a known flow or carries a valid cookie.
#[inline(always)]
fn select_in(ctx: &SkReuseportContext, slot: u32, index: u32, affinity_hit: bool) -> bool {
    // Bounded for the verifier; callers already keep index below the socket count.
    let index = index % MAX_SOCKETS;
    let slot = slot % GENERATION_SLOTS;
    let Some(sockarray) = GENERATIONS.get(slot) else {
        count(slot, 0, |c| c.fallback += 1);
        return false;
    };
    match sockarray.select_reuseport(ctx, index) {
        Ok(()) => {
            count(slot, index, |c| {
                c.selected += 1;
                c.affinity_hits += affinity_hit as u64;
            });
            true
        }
        Err(_) => {
            count(slot, index, |c| c.errors += 1);
            false
        }
    }
}

/// Sticky flows: known flows keep their socket while it lives and they are not
/// idle; everything else is a new flow in the working generation.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "passed by value, the keys are copied before each lookup: the selector grew from 758 to 770 instructions"
)]
fn select_flow(ctx: &SkReuseportContext, control: &Control, working_slot: u32) {
    let sockets = control.socket_count as u32;
    let settings = Settings::from_word(word(control_index::SLOT_SETTINGS + working_slot));
    let idle_ms = settings.flow_idle_ms as u64;
    // The supervisor's clock word: an array read instead of a helper call.
    let mut now = word(control_index::CLOCK_MS);
    if now == 0 {
        // SAFETY: a helper that takes no arguments and only reads a clock.
        now = unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000;
    }
    // SAFETY: a helper without arguments; the verifier turns it into one load.
    let ticks = unsafe { bpf_jiffies64() };

    // The fast path: this CPU read the flow's entry a moment ago (see `CachedFlow`).
    let hash = ctx.hash();
    let cached = FLOW_CACHE.get_ptr_mut(hash & (FLOW_CACHE_ENTRIES - 1));
    let identity = cache_key(ctx, hash);
    if let (Some(cached), Some(identity)) = (cached, identity)
        && table_calm(ticks)
    {
        // SAFETY: this CPU's slot of a preallocated per-CPU array; only this program
        // uses it, with migration disabled, so nothing writes it meanwhile.
        let copy = unsafe { *cached };
        if copy.key == identity
            && ticks.wrapping_sub(copy.read_jiffies) < FLOW_CACHE_TRUST_JIFFIES
            && now.saturating_sub(copy.last_seen_ms) < idle_ms / 4
            && word(control_index::SLOT_GENERATION + copy.slot as u32) == copy.generation as u64
            && select_in(ctx, copy.slot as u32, copy.socket as u32, true)
        {
            return;
        }
    }

    let Some(key) = flow_key(ctx) else {
        // Not IPv4/IPv6 or unreadable: no key to stick to.
        select_in(ctx, working_slot, random_below(sockets), false);
        return;
    };
    let copy_to = cached.zip(identity);
    let known_entry = FLOWS.get_ptr_mut(&key);
    if known_entry.is_none()
        && let Some((cached, identity)) = copy_to
        && restore(ctx, &key, cached, identity, now, idle_ms, ticks)
    {
        return;
    }
    if let Some(entry) = known_entry {
        // SAFETY: a pointer to the value of a successful lookup; LRU entries stay
        // valid for the program's run (RCU), and a concurrent refresh of
        // `last_seen_ms` by another CPU is a benign race on a timestamp.
        let mut known = unsafe { *entry };
        let age = now.saturating_sub(known.last_seen_ms);
        let slot = known.slot as u32 % GENERATION_SLOTS;
        if age >= idle_ms {
            flow_count(|c| c.expired += 1);
        } else if word(control_index::SLOT_GENERATION + slot) != known.generation as u64 {
            flow_count(|c| c.socket_gone += 1);
        } else if select_in(ctx, slot, known.socket as u32, true) {
            if age > idle_ms / 4 {
                // SAFETY: the same entry pointer, still valid in this run; one
                // aligned 8-byte store, racing at worst with another CPU storing
                // its own, equally recent, timestamp.
                unsafe { (*entry).last_seen_ms = now };
                known.last_seen_ms = now;
            }
            remember(copy_to, &known, ticks);
            return;
        } else {
            flow_count(|c| c.socket_gone += 1);
        }
    }

    let index = random_below(sockets);
    if select_in(ctx, working_slot, index, false) {
        let entry = FlowEntry {
            last_seen_ms: now,
            generation: control.generation,
            socket: index as u16,
            slot: working_slot as u8,
            _pad: 0,
        };
        if FLOWS.insert(&key, &entry, BPF_ANY as u64).is_ok() {
            count_insert();
            // Not copied into the cache: a flow is, once it comes back (a table
            // hit), so a flood of one-datagram sources cannot push the copies of
            // busy flows out of it.
            let first_seen = known_entry.is_none() as u64;
            flow_count(|c| {
                c.new_flows += 1;
                c.first_seen += first_seen;
            });
        } else {
            flow_count(|c| c.insert_failed += 1);
        }
    }
}

/// A flow the table no longer holds but this CPU's copy does (the LRU evicted it
/// while the copy answered for it, or under a flood of new flows): put back where
/// the copy says, if that socket still lives and the flow has not been idle for
/// `flow_idle`. Counted as a hit and, since it enters the table again, as first
/// seen (which keeps `first_seen - entries` the number of evictions).
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "passed by value, the keys are copied before each lookup"
)]
fn restore(
    ctx: &SkReuseportContext,
    key: &FlowKey,
    cached: *mut CachedFlow,
    identity: u64,
    now: u64,
    idle_ms: u64,
    ticks: u64,
) -> bool {
    // SAFETY: as in `select_flow`: this CPU's slot, this program its only user.
    let copy = unsafe { *cached };
    let slot = copy.slot as u32 % GENERATION_SLOTS;
    if copy.key != identity
        || now.saturating_sub(copy.last_seen_ms) >= idle_ms
        || word(control_index::SLOT_GENERATION + slot) != copy.generation as u64
        || !select_in(ctx, slot, copy.socket as u32, true)
    {
        return false;
    }
    let entry = FlowEntry {
        last_seen_ms: now,
        generation: copy.generation,
        socket: copy.socket,
        slot: copy.slot,
        _pad: 0,
    };
    if FLOWS.insert(key, &entry, BPF_ANY as u64).is_ok() {
        count_insert();
        remember(Some((cached, identity)), &entry, ticks);
        flow_count(|c| c.first_seen += 1);
    } else {
        flow_count(|c| c.insert_failed += 1);
    }
    true
}

/// One more flow recorded in `FLOWS`, for the pressure check.
#[inline(always)]
fn count_insert() {
    if let Some(inserts) = FLOW_INSERTS.get_ptr_mut(0) {
        atomic_add(inserts, 1);
    }
}

/// Whether this CPU may answer from its cache: false while flows are recorded
/// faster than `FLOW_TABLE_SIZE / FLOW_PRESSURE_DIVISOR` per window (see
/// `FLOW_PRESSURE_DIVISOR`). Judged once per window from the count of the window
/// before, so a flood turns the cache off within a window and a calm window turns it
/// on again.
#[inline(always)]
fn table_calm(ticks: u64) -> bool {
    let Some(pressure) = FLOW_PRESSURE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a preallocated per-CPU array; only this program
    // uses it, with migration disabled.
    let pressure = unsafe { &mut *pressure };
    if ticks.wrapping_sub(pressure.window_start) >= FLOW_CACHE_TRUST_JIFFIES {
        let inserts = match FLOW_INSERTS.get_ptr(0) {
            // SAFETY: a pointer into a preallocated array; one aligned 8-byte load
            // of a word other CPUs only add to atomically.
            Some(inserts) => unsafe { core::ptr::read_volatile(inserts) },
            None => return false,
        };
        // SAFETY: a read-only global, set once at load.
        let table = unsafe { core::ptr::read_volatile(&FLOW_TABLE_SIZE) };
        let threshold = (table / FLOW_PRESSURE_DIVISOR) as u64;
        pressure.busy = (inserts.wrapping_sub(pressure.inserts_at_start) > threshold) as u64;
        pressure.window_start = ticks;
        pressure.inserts_at_start = inserts;
    }
    pressure.busy == 0
}

/// Adds `value` to the word at `word` with the BPF atomic add, so that CPUs
/// adding at the same time lose nothing.
#[inline(always)]
fn atomic_add(word: *mut u64, value: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: `word` points into a preallocated array entry, valid and 8-byte
    // aligned while the program runs (callers pass a successful lookup's pointer);
    // the instruction reads and writes only those 8 bytes.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({word} + 0) += {value}",
            word = in(reg) word,
            value = in(reg) value,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above (this build is never run: the program only runs in the kernel).
    unsafe {
        *word += value;
    }
}

/// The datagram's identity in the cache: the kernel's 4-tuple hash, the remote
/// port and the family, read in place.
#[inline(always)]
fn cache_key(ctx: &SkReuseportContext, hash: u32) -> Option<u64> {
    let data = ctx.data();
    if data + 2 > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds-checked against data_end just above.
    let port = unsafe { core::ptr::read_unaligned(data as *const u16) };
    let family: u64 = match ctx.eth_protocol() {
        ETH_P_IP_BE => 4,
        ETH_P_IPV6_BE => 6,
        _ => return None,
    };
    Some(hash as u64 | (port as u64) << 32 | family << 48)
}

/// Copies a `FLOWS` entry, read at `ticks`, into this CPU's cache slot.
#[inline(always)]
fn remember(copy_to: Option<(*mut CachedFlow, u64)>, entry: &FlowEntry, ticks: u64) {
    if let Some((cached, identity)) = copy_to {
        // SAFETY: as in `select_flow`: this CPU's slot, this program its only user.
        unsafe {
            *cached = CachedFlow {
                key: identity,
                read_jiffies: ticks,
                last_seen_ms: entry.last_seen_ms,
                generation: entry.generation,
                socket: entry.socket,
                slot: entry.slot,
                _pad: 0,
            }
        };
    }
}

/// Cookies: the datagram names (generation, socket); a cookie naming a live
/// socket goes there, anything else is a new flow in the working generation.
#[inline(always)]
fn select_cookie(ctx: &SkReuseportContext, working_slot: u32, sockets: u32) {
    let settings = Settings::from_word(word(control_index::SLOT_SETTINGS + working_slot));
    if let Some(cookie) = read_cookie(ctx, settings.cookie_offset as u32) {
        let (generation_byte, socket) = parse_cookie(cookie);
        let slot = generation_byte as u32 % GENERATION_SLOTS;
        let owner = word(control_index::SLOT_GENERATION + slot);
        if owner != 0 && owner as u8 == generation_byte && select_in(ctx, slot, socket as u32, true)
        {
            return;
        }
    }
    flow_count(|c| c.cookie_invalid += 1);
    select_in(ctx, working_slot, random_below(sockets), false);
}

/// The 16-bit big-endian cookie at `payload_offset` of the UDP payload: read in
/// place when it lies in the packet's linear data (loopback and most drivers put
/// small datagrams there), else copied out by the helper.
#[inline(always)]
fn read_cookie(ctx: &SkReuseportContext, payload_offset: u32) -> Option<u16> {
    // `data` starts at the UDP header; the payload follows it.
    let offset = UDP_HEADER_LEN + payload_offset;
    // Bounded for the verifier (a packet offset must stay below 64 KiB); larger
    // offsets take the helper.
    if offset < DIRECT_COOKIE_LIMIT {
        let at = ctx.data() + (offset & (DIRECT_COOKIE_LIMIT - 1)) as usize;
        if at + 2 <= ctx.data_end() {
            // SAFETY: the two bytes at `at` are inside [data, data_end), checked
            // just above; unaligned, so read as bytes.
            let bytes = unsafe { core::ptr::read_unaligned(at as *const [u8; 2]) };
            return Some(u16::from_be_bytes(bytes));
        }
    }
    let mut cookie = [0u8; 2];
    // SAFETY: the helper writes at most the 2 bytes asked for into `cookie`, a live
    // 2-byte local; it checks `offset` against the packet and fails (non-zero)
    // rather than read past it.
    let loaded = unsafe { bpf_skb_load_bytes(ctx.as_ptr(), offset, cookie.as_mut_ptr().cast(), 2) };
    (loaded == 0).then(|| u16::from_be_bytes(cookie))
}

/// Steers a datagram from one of the supervisor's probe sockets to the socket it
/// probes. Only runs while `PROBE_ACTIVE` is set (during an upgrade's readiness
/// phase), so its hash lookup is not on the normal path.
#[inline(always)]
fn steer_probe(ctx: &SkReuseportContext) -> bool {
    let data = ctx.data();
    if data + 2 > ctx.data_end() {
        return false;
    }
    // SAFETY: bounds-checked against data_end just above.
    let port = unsafe { core::ptr::read_unaligned(data as *const u16) };
    // SAFETY: the value is copied out at once and no reference is kept. Hash map
    // values stay mapped for the program's run (RCU); an entry that user space
    // deletes or rewrites meanwhile can at worst yield a stale copy, which steers
    // one datagram to a socket index that `select_in` bounds anyway.
    let Some(target) = (unsafe { PROBES.get(port) }) else {
        return false;
    };
    let target = *target;
    let Some(key) = flow_key(ctx) else {
        return false;
    };
    if key.family != target.family as u16 || key.addr != target.addr {
        return false;
    }
    select_in(ctx, target.slot as u32, target.socket as u32, false)
}

/// The remote address and port of the datagram.
#[inline(always)]
fn flow_key(ctx: &SkReuseportContext) -> Option<FlowKey> {
    // The UDP source port: the first two bytes at `data`.
    let data = ctx.data();
    if data + 2 > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds-checked against data_end just above.
    let port = unsafe { core::ptr::read_unaligned(data as *const u16) };
    let protocol = ctx.eth_protocol();
    // The address is built from loaded words rather than zeroed first: zeroing the
    // 20-byte key compiles to a call of a memset subprogram on every datagram.
    let (addr, family) = if protocol == ETH_P_IP_BE {
        let mut v4 = MaybeUninit::<u32>::uninit();
        load_network_header(ctx, 12, v4.as_mut_ptr().cast(), 4)?; // iphdr.saddr
        // SAFETY: the helper succeeded, so it wrote all 4 bytes.
        ([unsafe { v4.assume_init() }, 0, 0, 0], 4u16)
    } else if protocol == ETH_P_IPV6_BE {
        let mut v6 = MaybeUninit::<[u32; 4]>::uninit();
        load_network_header(ctx, 8, v6.as_mut_ptr().cast(), 16)?; // ipv6hdr.saddr
        // SAFETY: the helper succeeded, so it wrote all 16 bytes.
        (unsafe { v6.assume_init() }, 6)
    } else {
        return None;
    };
    Some(FlowKey { addr, port, family })
}

/// Copies `len` bytes at `offset` of the network header into `to`; None if the
/// packet is shorter.
#[inline(always)]
fn load_network_header(
    ctx: &SkReuseportContext,
    offset: u32,
    to: *mut core::ffi::c_void,
    len: u32,
) -> Option<()> {
    // SAFETY: callers pass `to` pointing at a live local of at least `len` bytes (the
    // helper takes uninitialised memory); it checks the offset against the packet
    // and fails rather than read past it.
    let loaded =
        unsafe { bpf_skb_load_bytes_relative(ctx.as_ptr(), offset, to, len, BPF_HDR_START_NET) };
    (loaded == 0).then_some(())
}

/// Maps a uniform 32-bit number onto `0..n` with a multiply and a shift instead of
/// a division (Lemire's reduction; the bias is below 2^-26 for n <= 64).
#[inline(always)]
fn scale(uniform: u32, n: u32) -> u32 {
    ((uniform as u64 * n as u64) >> 32) as u32
}

/// A uniform random number below `n`, from this CPU's xorshift64 generator: a few
/// instructions on a per-CPU word instead of a helper call per datagram. Seeded
/// from the kernel's generator on first use on each CPU.
#[inline(always)]
fn random_below(n: u32) -> u32 {
    let Some(state) = RANDOM_STATE.get_ptr_mut(0) else {
        // SAFETY: a helper that takes no arguments.
        return scale(unsafe { bpf_get_prandom_u32() }, n);
    };
    // SAFETY: per-CPU slot of a preallocated array; this program is its only user
    // and runs with migration disabled, so nothing else touches it meanwhile.
    let mut x = unsafe { *state };
    if x == 0 {
        // SAFETY: a helper that takes no arguments. The `| 1` keeps the state non-zero.
        x = unsafe { ((bpf_get_prandom_u32() as u64) << 32) | bpf_get_prandom_u32() as u64 } | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    // SAFETY: as above.
    unsafe { *state = x };
    scale((x >> 32) as u32, n)
}

#[inline(always)]
fn count(slot: u32, socket: u32, bump: impl FnOnce(&mut SocketCounters)) {
    if let Some(counters) = COUNTERS.get_ptr_mut(counter_index(slot, socket)) {
        // SAFETY: per-CPU slot of a preallocated array; this program is the only
        // writer on this CPU and runs with migration disabled.
        bump(unsafe { &mut *counters });
    }
}

#[inline(always)]
fn flow_count(bump: impl FnOnce(&mut FlowCounters)) {
    if let Some(counters) = FLOW_COUNTERS.get_ptr_mut(0) {
        // SAFETY: as in `count`.
        bump(unsafe { &mut *counters });
    }
}

// The panic handler comes from this crate's lib (`supervisor_ebpf`).
use supervisor_ebpf as _;

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"MIT\0";
