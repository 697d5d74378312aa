#!/usr/bin/env bash
# The parsers' property tests, for longer than `cargo test` runs them:
#   - the config parser (supervisor/src/config/fuzz.rs): random text, mutated valid
#     files and files assembled from the known keys never panic, are refused with
#     one line naming the file, or are accepted within every documented bound;
#   - the notify-message parser and the control-protocol decoder (the `fuzz`
#     modules in supervisor/src/notify.rs and control.rs): no panic, every
#     rejection a clear error, kept text bounded.
#   ./scripts/fuzz.sh            # 100 000 cases per property (several minutes)
#   ./scripts/fuzz.sh 1000000    # more
# Needs no root. A failure prints the minimal input and records it under
# supervisor/proptest-regressions/, which later runs try first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${1:-100000}"
echo "== parser property tests (config, notify, control), $PROPTEST_CASES cases per property"
exec cargo test -p supervisor --lib fuzz
