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
    // The test-only variant selector (the `selector-variant` feature). Cargo gives
    // each feature set its own OUT_DIR, so the two builds do not rebuild each other.
    let features: &[&str] = if env::var_os("CARGO_FEATURE_SELECTOR_VARIANT").is_some() {
        &["variant"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "supervisor-ebpf",
            root_dir: ebpf_dir,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
