//! Builds the eBPF programs (`supervisor-ebpf`) with the nightly toolchain for
//! `bpfel-unknown-none` and puts the object in `OUT_DIR`, where `src/ebpf.rs`
//! embeds it with `include_bytes_aligned!`. This is aya's own recipe (aya-build):
//! a plain `cargo build` of this crate rebuilds the kernel side when it changes.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .expect("supervisor/ sits in the workspace root");
    let ebpf_dir = workspace.join("supervisor-ebpf");
    let common_dir = workspace.join("supervisor-common");
    // aya-build watches the eBPF crate's directory; the shared types live beside it.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "supervisor-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
