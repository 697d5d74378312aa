//! The `SK_REUSEPORT` selector: picks, for every datagram that reaches a
//! listener's reuseport group, one socket of the generation that serves.
//!
//! The whole decision rests on one 8-byte control word (see
//! `supervisor_common::Control`): user space flips generations by storing a new
//! word, so a datagram sees either the old generation or the new one, whole.
//! Any miss (no generation yet, slot empty, socket gone) returns `SK_PASS`
//! without a selection, which makes the kernel choose by its own hash: the
//! selector never drops a datagram.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, sk_action::SK_PASS},
    btf_maps::{Array, ArrayOfMaps, PerCpuArray, ReusePortSockArray},
    helpers::bpf_get_prandom_u32,
    macros::{btf_map, sk_reuseport},
    programs::SkReuseportContext,
};
use supervisor_common::{
    BalanceMode, COUNTER_ENTRIES, Control, GENERATION_SLOTS, MAX_SOCKETS, SocketCounters,
    counter_index,
};

#[btf_map]
static CONTROL: Array<u64, 1, { BPF_F_MMAPABLE as usize }> = Array::new();

#[btf_map]
static GENERATIONS: ArrayOfMaps<
    ReusePortSockArray<{ MAX_SOCKETS as usize }>,
    { GENERATION_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
static COUNTERS: PerCpuArray<SocketCounters, { COUNTER_ENTRIES as usize }> =
    PerCpuArray::new();

#[sk_reuseport]
pub fn select_socket(ctx: SkReuseportContext) -> u32 {
    select(&ctx);
    // SK_PASS with a selection delivers to the selected socket; without one the
    // kernel picks. SK_DROP is never returned.
    SK_PASS
}

#[inline(always)]
fn select(ctx: &SkReuseportContext) {
    let Some(word) = CONTROL.get_ptr(0) else {
        return;
    };
    // One 8-byte load: the flip is one 8-byte store on the other side.
    // SAFETY: the pointer comes from a successful lookup in a 1-entry array.
    let control = Control::from_word(unsafe { core::ptr::read_volatile(word) });
    let sockets = control.socket_count as u32;
    if sockets == 0 {
        return;
    }
    let slot = control.working_slot as u32 % GENERATION_SLOTS;
    let index = match BalanceMode::from_u8(control.balance_mode) {
        Some(BalanceMode::Hash) => ctx.hash() % sockets,
        // Random, and any mode this build does not know: spread evenly.
        _ => scale(unsafe { bpf_get_prandom_u32() }, sockets),
    };
    // Bounded for the verifier; `index < sockets <= MAX_SOCKETS` already.
    let index = index % MAX_SOCKETS;

    let Some(sockarray) = GENERATIONS.get(slot) else {
        count(slot, 0, |c| c.fallback += 1);
        return;
    };
    match sockarray.select_reuseport(ctx, index) {
        Ok(()) => count(slot, index, |c| c.selected += 1),
        Err(_) => count(slot, index, |c| c.errors += 1),
    }
}

/// Maps a uniform 32-bit random number onto `0..n` with a multiply and a shift
/// instead of a division (Lemire's reduction; the bias is below 2^-26 for n <= 64).
#[inline(always)]
fn scale(random: u32, n: u32) -> u32 {
    ((random as u64 * n as u64) >> 32) as u32
}

#[inline(always)]
fn count(slot: u32, socket: u32, bump: impl FnOnce(&mut SocketCounters)) {
    if let Some(counters) = COUNTERS.get_ptr_mut(counter_index(slot, socket)) {
        // SAFETY: per-CPU slot of a preallocated array; this program is the only
        // writer on this CPU and runs with migration disabled.
        bump(unsafe { &mut *counters });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"MIT\0";
