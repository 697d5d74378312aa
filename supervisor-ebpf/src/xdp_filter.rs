//! The XDP filter: drops unwanted datagrams to the service's listeners at the
//! interface, before the kernel builds an skb for them.
//!
//! It acts only on UDP to a listener's (address, port) (a wildcard listener address
//! matches any destination with its port) and passes everything else untouched:
//! other ports, other protocols, other addresses, ARP, VLAN-tagged frames (the
//! filter belongs on the VLAN's own interface then).
//!
//! For the service's datagrams, in order:
//! 1. **malformed** (if `drop_malformed`): IP header shorter than its IHL, a total or
//!    payload length beyond the frame, a UDP header that does not fit, or a UDP
//!    length that disagrees with the IP payload length (either way: the kernel
//!    would trim trailing bytes and deliver, which is how datagrams get smuggled
//!    past length-based parsers). A UDP packet whose port cannot be read at all is
//!    checked against the listeners' addresses only (the "address only" entries of
//!    the listener table) and dropped as malformed if it is addressed to the service.
//! 2. **denied / not allowed**: one longest-prefix match of the source, whose
//!    entries user space built so that deny always wins: a walk of array reads in
//!    a multibit table (16 bits, then 8 at a time), at most three for IPv4 and one
//!    more than the longest IPv6 prefix's bits beyond 16 divided by 8 for IPv6;
//!    a trie lookup only under the IPv6 entries the table had no room for.
//! 3. **rate limited**: GCRA (a token bucket kept as one u64 "theoretical arrival
//!    time") in the source's bucket of an array (a keyed hash of the address picks
//!    it; sources sharing a bucket share a rate); time from `bpf_jiffies64` (the
//!    tick's). Three inlined array reads (seed, tick length, bucket), no call, and
//!    one 8-byte store per datagram. Two CPUs updating one bucket at the
//!    same instant may both admit a datagram: the limit is exact per CPU,
//!    approximate across CPUs, which is the usual trade for not taking a lock per
//!    packet.
//!
//! Fragments: a non-first fragment (offset > 0) has no UDP header, so its port is
//! unknown; it passes (counted as `FRAGMENT`). The first fragment carries the UDP
//! header and gets the full verdict, with the length check relaxed to "the UDP length
//! covers more than this fragment". Dropping the first fragment is enough: the
//! kernel cannot reassemble the datagram without it and frees the rest after
//! `ipfrag_time`. A first fragment too short to hold the UDP header (RFC 1858's tiny
//! fragment) is malformed.
//!
//! IPv6 extension headers (hop-by-hop, routing, destination options, fragment) are
//! walked, at most `MAX_EXTENSION_HEADERS` of them; a chain longer than that, or one
//! cut short, to one of the service's addresses is treated as malformed.
//!
//! The listener match is one array read of the destination port's entry (see
//! `supervisor_common::xdp::ListenerPort`); only a port with several listener
//! addresses of one family costs a hash lookup.
//!
//! Which ruleset applies is decided once per packet by one 8-byte load of the control
//! word (see `supervisor_common::xdp::RulesetControl`); every lookup then uses that
//! slot, so a packet never mixes two rulesets.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    helpers::generated::bpf_jiffies64,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use supervisor_common::xdp::{
    FAMILY_V4, FAMILY_V6, LISTENER_PORT_ENTRIES, ListenerKey, ListenerPort, ListenerRule,
    MAX_LISTENER_KEYS, MAX_PREFIXES, MAX_V6_SKIPS, PORT_V4_ANY, PORT_V4_MANY, PORT_V4_ONE,
    PORT_V6_ANY, PORT_V6_MANY, PORT_V6_ONE, PREFIX_FIRST_ENTRIES, PrefixSkip, RATE_ENTRIES,
    RATE_SEED_INDEX, RATE_TICK_NS_INDEX, RULE_DROP_MALFORMED, RULE_RATE_LIMIT, RULESET_SLOTS,
    RulesetControl, V4_CHUNK_TABLE_ENTRIES, V6_CHUNK_LEVELS, V6_CHUNK_TABLE_ENTRIES, VERDICT_DENY,
    VERDICT_NOT_ALLOWED, XdpCounter, counter, prefix_table, rate_bucket,
};

#[btf_map]
static CONTROL: Array<u64, 1, { BPF_F_MMAPABLE as usize }> = Array::new();

#[btf_map]
static LISTENER_PORTS: ArrayOfMaps<
    Array<ListenerPort, { LISTENER_PORT_ENTRIES as usize }>,
    { RULESET_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static RULES: Array<ListenerRule, { RULESET_SLOTS as usize }> = Array::new();

#[btf_map]
static LISTENERS: ArrayOfMaps<
    HashMap<ListenerKey, ListenerRule, { MAX_LISTENER_KEYS as usize }>,
    { RULESET_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static PREFIXES_V4: ArrayOfMaps<
    Array<u32, { PREFIX_FIRST_ENTRIES as usize }>,
    { RULESET_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static PREFIXES_V4_CHUNKS: ArrayOfMaps<
    Array<u32, { V4_CHUNK_TABLE_ENTRIES as usize }>,
    { RULESET_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static PREFIXES_V6: ArrayOfMaps<
    Array<u32, { PREFIX_FIRST_ENTRIES as usize }>,
    { RULESET_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static PREFIXES_V6_CHUNKS: ArrayOfMaps<
    Array<u32, { V6_CHUNK_TABLE_ENTRIES as usize }>,
    { RULESET_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static PREFIXES_V6_SKIPS: ArrayOfMaps<
    Array<PrefixSkip, { MAX_V6_SKIPS as usize }>,
    { RULESET_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static PREFIXES_V6_TRIE: ArrayOfMaps<
    LpmTrie<[u8; 16], u32, { MAX_PREFIXES as usize }>,
    { RULESET_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static RATE: Array<u64, { RATE_ENTRIES as usize }> = Array::new();

#[btf_map]
static COUNTERS: PerCpuArray<XdpCounter, { counter::COUNT as usize }> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// Longest IPv6 extension header chain walked before giving up (see the module docs).
const MAX_EXTENSION_HEADERS: usize = 6;

/// (XDP action, counter index).
type Verdict = (u32, u32);
const NOT_OURS: Verdict = (XDP_PASS, counter::NOT_OURS);
const FRAGMENT: Verdict = (XDP_PASS, counter::FRAGMENT);
const PASSED: Verdict = (XDP_PASS, counter::PASSED);

#[xdp]
pub fn xdp_filter(ctx: XdpContext) -> u32 {
    // The test build `selector-variant` (see supervisor/Cargo.toml) differs from the
    // real one by this check, which never holds (a packet never ends before it
    // starts): another program, for the tests of replacing the filter in place.
    #[cfg(feature = "variant")]
    if ctx.data_end() < ctx.data() {
        return XDP_PASS;
    }
    let (action, reason) = filter(&ctx);
    count(reason, (ctx.data_end() - ctx.data()) as u64);
    action
}

#[inline(always)]
fn filter(ctx: &XdpContext) -> Verdict {
    let Some(eth) = ptr_at::<[u8; ETH_HLEN]>(ctx, 0) else {
        return NOT_OURS;
    };
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &*eth };
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => ipv4(ctx),
        ETH_P_IPV6 => ipv6(ctx),
        _ => NOT_OURS,
    }
}

/// The slot to use for this packet, or `None` while no ruleset is installed.
#[inline(always)]
fn ruleset_slot() -> Option<u32> {
    let word = CONTROL.get_ptr(0)?;
    // One 8-byte load: the switch is one 8-byte store on the other side.
    // SAFETY: the pointer comes from a successful lookup in a 1-entry array.
    let control = RulesetControl::from_word(unsafe { core::ptr::read_volatile(word) });
    if control.armed == 0 {
        return None;
    }
    Some(control.slot as u32 % RULESET_SLOTS)
}

/// The fixed IPv4 header. The addresses are read as 4-byte words, kept in wire
/// order (never byte-swapped) for comparing and for keys.
#[repr(C)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    fragment: [u8; 2],
    ttl: u8,
    protocol: u8,
    checksum: [u8; 2],
    src: u32,
    dst: u32,
}

/// The fixed IPv6 header, addresses as 4-byte words in wire order.
#[repr(C)]
struct Ipv6Header {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next: u8,
    hop_limit: u8,
    src: [u32; 4],
    dst: [u32; 4],
}

/// An address as 4-byte words in wire order; IPv4 in the first word, the rest zero.
type Addr = [u32; 4];

#[inline(always)]
fn ipv4(ctx: &XdpContext) -> Verdict {
    // Without the fixed header neither destination nor protocol can be read: not
    // identifiable as the service's; the kernel drops such a packet itself.
    let Some(header) = ptr_at::<Ipv4Header>(ctx, ETH_HLEN) else {
        return NOT_OURS;
    };
    // SAFETY: bounds checked by ptr_at. The 4-byte address fields may be unaligned
    // in the packet: the verifier accepts unaligned packet loads (the program is not
    // loaded with BPF_F_STRICT_ALIGNMENT) and the JITs that run XDP do them.
    let h = unsafe { &*header };
    if h.version_ihl >> 4 != 4 || h.protocol != IPPROTO_UDP {
        return NOT_OURS;
    }
    let fragment = u16::from_be_bytes(h.fragment);
    if fragment & 0x1fff != 0 {
        return FRAGMENT;
    }
    let more_fragments = fragment & 0x2000 != 0;
    let Some(slot) = ruleset_slot() else {
        return NOT_OURS;
    };
    let src = h.src;
    let dst = [h.dst, 0, 0, 0];
    let ihl = ((h.version_ihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes(h.total_len) as usize;
    let frame_ip_len = ctx.data_end() - ctx.data() - ETH_HLEN;

    // The UDP header at IHL (options skipped). `ihl` is at most 60 here, which
    // keeps the variable packet offset within what the verifier can track.
    let udp = if ihl >= 20 {
        ptr_at::<[u8; UDP_HLEN]>(ctx, ETH_HLEN + ihl)
    } else {
        None
    };
    let (rule, malformed) = match udp {
        Some(udp) => {
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            let port = u16::from_be_bytes([udp[2], udp[3]]);
            let Some(rule) = listener(slot, FAMILY_V4, &dst, port) else {
                return NOT_OURS;
            };
            let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            let malformed = total_len < ihl + UDP_HLEN
                || total_len > frame_ip_len
                || udp_len_malformed(udp_len, total_len - ihl, more_fragments);
            (rule, malformed)
        }
        None => match listener(slot, FAMILY_V4, &dst, 0) {
            Some(rule) => (rule, true),
            None => return NOT_OURS,
        },
    };
    if malformed && rule.flags & RULE_DROP_MALFORMED != 0 {
        return (XDP_DROP, counter::MALFORMED);
    }
    match prefix_v4(slot, u32::from_be(src)) {
        VERDICT_DENY => return (XDP_DROP, counter::DENIED),
        VERDICT_NOT_ALLOWED => return (XDP_DROP, counter::NOT_ALLOWED),
        _ => {}
    }
    rate_limit(&rule, [src, 0, 0, 0], FAMILY_V4)
}

/// The verdict of the longest IPv4 prefix covering `src` (host order), or 0: at
/// most three inlined array reads (see `supervisor_common::xdp::prefix_table`).
#[inline(always)]
fn prefix_v4(slot: u32, src: u32) -> u32 {
    let Some(first) = PREFIXES_V4.get(slot) else {
        return 0;
    };
    let mut entry = first.get(src >> 16).copied().unwrap_or(0);
    if entry & prefix_table::CHUNK != 0 {
        let Some(chunks) = PREFIXES_V4_CHUNKS.get(slot) else {
            return 0;
        };
        entry = chunks
            .get(chunk_index(entry, src >> 8))
            .copied()
            .unwrap_or(0);
        if entry & prefix_table::CHUNK != 0 {
            entry = chunks.get(chunk_index(entry, src)).copied().unwrap_or(0);
        }
    }
    if entry == 0 {
        entry = first.get(prefix_table::DEFAULT_INDEX).copied().unwrap_or(0);
    }
    entry
}

/// The verdict of the longest IPv6 prefix covering `src`, or 0: the first-level
/// read, then one inlined read per 8 bits where the prefixes on the source's path
/// branch, and one skip (a read and a compare of the source's words) per run where
/// they do not; a trie lookup only where user space ran out of room (see
/// `supervisor_common::xdp::PrefixSkip` and `MAX_V6_CHUNKS`).
#[inline(always)]
fn prefix_v6(slot: u32, src: &Addr) -> u32 {
    let Some(first) = PREFIXES_V6.get(slot) else {
        return 0;
    };
    let bytes = address_bytes(src);
    let top = u32::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    let mut entry = first.get(top).copied().unwrap_or(0);
    // The byte a chunk entry is indexed by: after a skip, the one after its run.
    let mut resume = 2;
    if entry & prefix_table::SKIP != 0 {
        (entry, resume) = skip(slot, entry, src);
    }
    if entry & prefix_table::CHUNK != 0 {
        let Some(chunks) = PREFIXES_V6_CHUNKS.get(slot) else {
            return 0;
        };
        // Unrolled by the compiler (constant bounds), so `bytes[at]` is a constant
        // stack offset in every copy; the bytes a skip compared are stepped over.
        for level in 0..V6_CHUNK_LEVELS {
            let at = 2 + level;
            if at < resume {
                continue;
            }
            let bits = u32::from(bytes[at]);
            entry = chunks.get(chunk_index(entry, bits)).copied().unwrap_or(0);
            resume = at + 1;
            if entry & prefix_table::SKIP != 0 {
                (entry, resume) = skip(slot, entry, src);
            }
            if entry & prefix_table::CHUNK == 0 {
                break;
            }
        }
    }
    match entry {
        prefix_table::ASK_TRIE => PREFIXES_V6_TRIE
            .get(slot)
            .and_then(|trie| trie.get(&Key::new(128, bytes)))
            .copied()
            .unwrap_or(0),
        0 => first.get(prefix_table::DEFAULT_INDEX).copied().unwrap_or(0),
        verdict => verdict,
    }
}

/// Follows the skip `entry` points to: (its `next` and the byte the walk resumes
/// at) when the source has the bytes it names, else (its `otherwise`, past the
/// end). A skip never leads to another (user space merges runs).
#[inline(always)]
fn skip(slot: u32, entry: u32, src: &Addr) -> (u32, usize) {
    let Some(skip) = PREFIXES_V6_SKIPS
        .get(slot)
        .and_then(|skips| skips.get(entry & !prefix_table::SKIP))
    else {
        return (0, 16);
    };
    let differs = ((src[0] & skip.mask[0]) ^ skip.value[0])
        | ((src[1] & skip.mask[1]) ^ skip.value[1])
        | ((src[2] & skip.mask[2]) ^ skip.value[2])
        | ((src[3] & skip.mask[3]) ^ skip.value[3]);
    if differs != 0 {
        (skip.otherwise, 16)
    } else {
        (skip.next, skip.resume as usize)
    }
}

/// The index in a chunk table of `bits`' low 8 bits in the chunk `entry` points to.
#[inline(always)]
fn chunk_index(entry: u32, bits: u32) -> u32 {
    (entry & !prefix_table::CHUNK) * prefix_table::CHUNK_ENTRIES + (bits & 0xff)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext) -> Verdict {
    let Some(header) = ptr_at::<Ipv6Header>(ctx, ETH_HLEN) else {
        return NOT_OURS;
    };
    // SAFETY: bounds checked by ptr_at; unaligned word loads as in `ipv4`.
    let h = unsafe { &*header };
    if h.version_class_flow[0] >> 4 != 6 {
        return NOT_OURS;
    }
    let payload_len = u16::from_be_bytes(h.payload_len) as usize;
    let src: Addr = h.src;
    let dst: Addr = h.dst;

    // Walk the extension headers to the UDP header.
    let mut next = h.next;
    let mut offset = ETH_HLEN + IPV6_HLEN;
    let mut more_fragments = false;
    let mut udp_at = None;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            IPPROTO_UDP => {
                udp_at = Some(offset);
                break;
            }
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(ext) = ptr_at::<[u8; 2]>(ctx, offset) else {
                    break;
                };
                // SAFETY: bounds checked by ptr_at.
                let ext = unsafe { &*ext };
                next = ext[0];
                offset += (ext[1] as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let Some(frag) = ptr_at::<[u8; 8]>(ctx, offset) else {
                    break;
                };
                // SAFETY: bounds checked by ptr_at.
                let frag = unsafe { &*frag };
                let offset_and_flags = u16::from_be_bytes([frag[2], frag[3]]);
                if offset_and_flags & 0xfff8 != 0 {
                    return if frag[0] == IPPROTO_UDP {
                        FRAGMENT
                    } else {
                        NOT_OURS
                    };
                }
                more_fragments = offset_and_flags & 1 != 0;
                next = frag[0];
                offset += 8;
            }
            // TCP, ICMPv6, ESP, "no next header", ...: not UDP.
            _ => return NOT_OURS,
        }
    }
    // A UDP header at `offset` if the chain ended there (the last iteration may
    // have stepped onto it without seeing it).
    if udp_at.is_none() && next == IPPROTO_UDP {
        udp_at = Some(offset);
    }

    let Some(slot) = ruleset_slot() else {
        return NOT_OURS;
    };
    let frame_ip_len = ctx.data_end() - ctx.data() - ETH_HLEN;
    let udp = match udp_at {
        // Bounded for the verifier: the chain above can reach a few KiB at most.
        Some(at) if at < 0x4000 => ptr_at::<[u8; UDP_HLEN]>(ctx, at).map(|p| (at, p)),
        _ => None,
    };
    let (rule, malformed) = match udp {
        Some((at, udp)) => {
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            let port = u16::from_be_bytes([udp[2], udp[3]]);
            let Some(rule) = listener(slot, FAMILY_V6, &dst, port) else {
                return NOT_OURS;
            };
            let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            let extensions = at - ETH_HLEN - IPV6_HLEN;
            // payload_len 0 is a jumbogram (RFC 2675), never seen on our links.
            let malformed = payload_len < extensions + UDP_HLEN
                || IPV6_HLEN + payload_len > frame_ip_len
                || udp_len_malformed(udp_len, payload_len - extensions, more_fragments);
            (rule, malformed)
        }
        // Cut short, too long a chain, or the UDP header missing: malformed if it is
        // addressed to the service (see the module docs).
        None => match listener(slot, FAMILY_V6, &dst, 0) {
            Some(rule) => (rule, true),
            None => return NOT_OURS,
        },
    };
    if malformed && rule.flags & RULE_DROP_MALFORMED != 0 {
        return (XDP_DROP, counter::MALFORMED);
    }
    match prefix_v6(slot, &src) {
        VERDICT_DENY => return (XDP_DROP, counter::DENIED),
        VERDICT_NOT_ALLOWED => return (XDP_DROP, counter::NOT_ALLOWED),
        _ => {}
    }
    rate_limit(&rule, src, FAMILY_V6)
}

/// The 16 bytes of an address in wire order.
#[inline(always)]
fn address_bytes(addr: &Addr) -> [u8; 16] {
    // SAFETY: four u32 and sixteen u8 have the same size and every bit pattern is
    // valid for both; the words hold the bytes in wire order.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(*addr) }
}

/// Whether the UDP length field disagrees with the IP payload carrying it. In a
/// first fragment the UDP length covers the whole datagram, so it must exceed this
/// fragment's payload instead of matching it.
#[inline(always)]
fn udp_len_malformed(udp_len: usize, ip_payload: usize, more_fragments: bool) -> bool {
    udp_len < UDP_HLEN
        || if more_fragments {
            udp_len <= ip_payload
        } else {
            udp_len != ip_payload
        }
}

/// The rule for a datagram to (`dst`, `port`), if a listener takes it: one inlined
/// read of the port's `LISTENER_PORTS` entry, and a `LISTENERS` hash lookup only
/// when several addresses of the family listen on that port.
#[inline(always)]
fn listener(slot: u32, family: u8, dst: &Addr, port: u16) -> Option<ListenerRule> {
    let entry = LISTENER_PORTS.get(slot)?.get(u32::from(port))?;
    let (any, one, many) = if family == FAMILY_V4 {
        (PORT_V4_ANY, PORT_V4_ONE, PORT_V4_MANY)
    } else {
        (PORT_V6_ANY, PORT_V6_ONE, PORT_V6_MANY)
    };
    let matches_one = || {
        if family == FAMILY_V4 {
            u32::from_ne_bytes(entry.v4) == dst[0]
        } else {
            address_bytes(dst) == entry.v6
        }
    };
    if entry.flags & any != 0 || (entry.flags & one != 0 && matches_one()) {
        return RULES.get(slot).copied();
    }
    if entry.flags & many == 0 {
        return None;
    }
    let key = ListenerKey {
        addr: address_bytes(dst),
        port: port.to_be_bytes(),
        family,
        _pad: 0,
    };
    let rule = LISTENERS.get(slot)?.get_ptr(key)?;
    // SAFETY: user space never changes a ruleset's table after installing it, so
    // the entry cannot be reused under us.
    Some(unsafe { *rule })
}

/// GCRA: admit when the source bucket's theoretical arrival time is at most
/// `tolerance_ns` ahead of now, then move it one interval on. The bucket is an
/// inlined array read (see `supervisor_common::xdp::RATE_BUCKETS`); the time is the
/// tick's, `bpf_jiffies64` (inlined) times the tick length user space stored: no
/// call, where `bpf_ktime_get_ns` costs about 40 ns here (docs/xdp-cost.md; the
/// accuracy this gives is in docs/config.md).
#[inline(always)]
fn rate_limit(rule: &ListenerRule, addr: Addr, family: u8) -> Verdict {
    if rule.flags & RULE_RATE_LIMIT == 0 {
        return PASSED;
    }
    let seed = RATE.get(RATE_SEED_INDEX).copied().unwrap_or(0);
    let Some(tat) = RATE.get_ptr_mut(rate_bucket(seed, family, addr)) else {
        return PASSED;
    };
    let tick_ns = RATE.get(RATE_TICK_NS_INDEX).copied().unwrap_or(0);
    // SAFETY: a helper without arguments (the verifier inlines it: a load of jiffies).
    let now = unsafe { bpf_jiffies64() } * tick_ns;
    // SAFETY: a pointer into a preallocated array, valid while the program runs.
    // Two CPUs updating one bucket at once may both admit a datagram (see the
    // module docs).
    let current = unsafe { *tat };
    if current > now + rule.tolerance_ns {
        return (XDP_DROP, counter::RATE_LIMITED);
    }
    let base = if current > now { current } else { now };
    // SAFETY: as above; one aligned 8-byte store.
    unsafe { *tat = base + rule.interval_ns };
    PASSED
}

#[inline(always)]
fn count(reason: u32, bytes: u64) {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason) {
        // SAFETY: this CPU's slot of a preallocated per-CPU array; XDP runs with
        // migration disabled, so this program is its only writer meanwhile.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

/// A pointer to `T` at `offset` into the packet, if the whole `T` lies before
/// `data_end`: the bounds check the verifier demands before every packet read.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

// The panic handler comes from this crate's lib (`supervisor_ebpf`).
use supervisor_ebpf as _;

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"MIT\0";
