//! The eBPF objects built by `build.rs`, embedded in the binary.
pub static SELECTOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/selector"));

/// The XDP filter (`supervisor-ebpf/src/xdp_filter.rs`), managed by `crate::xdp`.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-filter"));
