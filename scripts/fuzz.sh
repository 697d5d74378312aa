#!/usr/bin/env bash
# The config parser's property tests (supervisor/src/config/fuzz.rs), for longer
# than `cargo test` runs them: random text, mutated valid files and files
# assembled from the known keys must never panic, must be refused with one line
# naming the file, or be accepted within every documented bound.
#   ./scripts/fuzz.sh            # 100 000 cases per property (a few minutes)
#   ./scripts/fuzz.sh 1000000    # more
# Needs no root. A failure prints the minimal input and records it under
# supervisor/proptest-regressions/, which later runs try first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${1:-100000}"
echo "== config parser property tests, $PROPTEST_CASES cases per property"
exec cargo test -p supervisor --lib config::fuzz
