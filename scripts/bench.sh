#!/usr/bin/env bash
# The benchmark, from a fresh machine of this kind, as root:
#   sudo ./scripts/bench.sh                 # about ten minutes on 2 cores (1000 upgrades: 5 of them)
#   sudo ./scripts/bench.sh --quick         # about two minutes
#   sudo ./scripts/bench.sh --json out.json # also write the raw figures
# Builds the release binaries (the benchmark drives target/release/{supervisor,
# supervisor-selector-variant,echo-worker}), then prints a markdown report on
# stdout; progress goes to stderr.
# Every figure is measured next to its baseline in the same run, each in its own
# network namespace; namespaces, pins and temporary files are removed at the end,
# also on Ctrl-C. `target/release/bench --help` lists the knobs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# First the supervisor build whose selector and XDP filter differ harmlessly (the
# `selector-variant` feature), kept under its own name: the xdp-replace figure
# re-execs into it and back. Then every binary of the normal build, which puts the
# normal supervisor back at target/release/supervisor (cargo keeps both feature
# sets' artifacts, so switching back and forth relinks nothing).
cargo build --release -p supervisor --bin supervisor --features selector-variant
cp target/release/supervisor target/release/supervisor-selector-variant
cargo build --bins --release
exec target/release/bench "$@"
