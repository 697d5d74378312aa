#!/usr/bin/env bash
# The main job in under a minute, from a fresh machine of this kind, as root:
#   sudo ./scripts/demo.sh
# Starts the supervisor on the built-in echo config (in a private network
# namespace), sends traffic from one sender, upgrades under that traffic, prints
# the phases and a summary, and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
cargo build --bins --release
exec target/release/demo "$@"
