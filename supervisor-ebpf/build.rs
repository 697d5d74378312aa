// aya-ebpf reads `bpf_target_arch` to pick per-architecture definitions; this
// declares the cfg (and sets it from the host when not cross-building).
fn main() -> aya_build::Result<()> {
    aya_build::emit_bpf_target_arch_cfg()
}
