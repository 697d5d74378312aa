//! Shared pieces of the supervisor's eBPF programs. Each program is a `[[bin]]`
//! that links this crate.
#![no_std]

/// eBPF programs cannot unwind or abort; the verifier proves the paths that
/// could panic unreachable, so this is never called. One handler for every
/// program of the crate.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
