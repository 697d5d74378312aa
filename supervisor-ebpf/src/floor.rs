//! The cheapest possible `SK_REUSEPORT` program: selects nothing, so the kernel
//! picks as if there were no program. Never attached by the supervisor; the
//! benchmark attaches it to measure the floor every selector pays (the cost of
//! running any program at all), so the selector's own cost can be read as the
//! difference.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_reuseport, programs::SkReuseportContext};

#[sk_reuseport]
pub fn select_nothing(_ctx: SkReuseportContext) -> u32 {
    SK_PASS
}

// The panic handler comes from this crate's lib (`supervisor_ebpf`).
use supervisor_ebpf as _;

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"MIT\0";
