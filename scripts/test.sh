#!/usr/bin/env bash
# The whole test suite, from a fresh machine of this kind, as root:
#   sudo ./scripts/test.sh
# Installs what the build needs (idempotent), checks formatting and lints, builds
# every binary the end-to-end tests run, then runs all tests. Tests that need root
# fail (never skip) when they cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo clippy, eBPF crate (nightly, bpfel-unknown-none, as supervisor/build.rs builds it)"
cargo +nightly clippy -p supervisor-ebpf --target bpfel-unknown-none -Z build-std=core --release -- -D warnings
echo "== unused dependencies (cargo-machete, every Cargo.toml of the workspace)"
cargo machete --skip-target-dir
echo "== cargo build (every binary the end-to-end tests run; the eBPF crate is built by supervisor/build.rs, so the default members are the whole host side)"
# First the test-only supervisor whose selector differs harmlessly (the
# `selector-variant` feature; tests/tests/reexec.rs re-execs into it), kept under
# its own name. Cargo keeps both feature sets' artifacts, so switching back and
# forth relinks nothing.
cargo build -p supervisor --bin supervisor --features selector-variant
cp target/debug/supervisor target/debug/supervisor-selector-variant
cargo build --bins
echo "== cargo test"
# Two at a time: every end-to-end test starts a supervisor, workers and a load
# generator in its own network namespace, and this machine has two cores.
cargo test -- --test-threads=2
