//! The eBPF objects built by `build.rs`, embedded in the binary.
pub static SELECTOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/selector"));

/// The XDP filter (`supervisor-ebpf/src/xdp_filter.rs`), managed by `crate::xdp`.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-filter"));

/// An `SK_REUSEPORT` program that selects nothing: the benchmark's floor
/// (`supervisor-ebpf/src/floor.rs`). Not used by the supervisor itself.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor"));

/// Loads the floor program and attaches it to the reuseport group of `socket`.
/// For benchmarks: returns the loaded object, which must stay alive while it is
/// measured, and the program's kernel id (to read its run time statistics).
pub fn attach_floor(socket: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<(aya::Ebpf, u32)> {
    let mut ebpf = aya::Ebpf::load(FLOOR_OBJECT)?;
    let program: &mut aya::programs::SkReuseport = ebpf
        .program_mut("select_nothing")
        .ok_or_else(|| anyhow::anyhow!("floor program missing"))?
        .try_into()?;
    program.load()?;
    program.attach(socket)?;
    let id = program.info()?.id();
    Ok((ebpf, id))
}
