#!/usr/bin/env bash
# The benchmark, from a fresh machine of this kind, as root:
#   sudo ./scripts/bench.sh                 # about ten minutes on 2 cores (1000 upgrades: 5 of them)
#   sudo ./scripts/bench.sh --quick         # about two minutes
#   sudo ./scripts/bench.sh --json out.json # also write the raw figures
# Builds the release binaries (the benchmark drives target/release/{supervisor,
# echo-worker}), then prints a markdown report on stdout; progress goes to stderr.
# Every figure is measured next to its baseline in the same run, each in its own
# network namespace; namespaces, pins and temporary files are removed at the end,
# also on Ctrl-C. `target/release/bench --help` lists the knobs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
cargo build --bins --release
exec target/release/bench "$@"
