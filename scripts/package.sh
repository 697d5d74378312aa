#!/usr/bin/env bash
# The Debian package, as root on a machine of this kind:
#   sudo ./scripts/package.sh            # release build (the one demo.sh and bench.sh make)
#   sudo ./scripts/package.sh --debug    # the debug build, packed fast (what tests/tests/package_deb.rs installs)
# Prints the .deb's path last: target/debian/udp-supervisor_<version>-1_<arch>.deb
# (--debug: target/debian/debug/...). Install it with `apt install ./that.deb`.
#
# 1. bootstrap (idempotent; installs cargo-deb among the rest);
# 2. `cargo build --bins` of the profile (every binary, as demo.sh/test.sh build them, so
#    nothing is built twice), which includes supervisor-package-assets;
# 3. generates into target/<profile>/package-assets: man pages (supervisor.1 and one per
#    subcommand, gzipped) and bash/zsh/fish completions from the CLI's clap definition,
#    and the unit files from examples/systemd/ with the packaged paths (/usr/bin);
# 4. `cargo deb --no-build` packs what supervisor/Cargo.toml's [package.metadata.deb] lists.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
bootstrap=yes
build=yes
for arg in "$@"; do
    case "$arg" in
        --debug) profile=debug ;;
        # For the package test, which runs under scripts/test.sh: that has bootstrapped
        # and built every binary already.
        --no-bootstrap) bootstrap=no ;;
        --no-build) build=no ;;
        *) echo "usage: $0 [--debug] [--no-bootstrap] [--no-build]" >&2; exit 2 ;;
    esac
done
log() { printf 'package: %s\n' "$*" >&2; }

if [ "$bootstrap" = yes ]; then
    bash scripts/bootstrap.sh
fi
export CARGO_TERM_COLOR=never
target=${CARGO_TARGET_DIR:-$PWD/target}
if [ "$profile" = release ]; then
    [ "$build" = no ] || cargo build --bins --release
    deb_args=(--profile release)
    out=$target/debian
else
    [ "$build" = no ] || cargo build --bins
    # cargo-deb warns that it is meant for release builds; this one is for the test.
    deb_args=(--profile dev --fast)
    out=$target/debian/debug
fi

assets=$target/$profile/package-assets
rm -rf "$assets"
"$target/$profile/supervisor-package-assets" "$assets" >/dev/null
# Debian ships man pages compressed (-n: no name or time stamp, a reproducible file).
gzip -9n "$assets"/man/*.1

# The examples' units expect the binary where a hand install puts it (/usr/local/bin);
# the package puts it in /usr/bin and its documentation in /usr/share/doc. Every other
# line, comments included, stays as it is.
mkdir -p "$assets/systemd"
for unit in examples/systemd/*.service; do
    sed -e 's|/usr/local/bin/supervisor|/usr/bin/supervisor|g' \
        -e 's|^Documentation=.*|Documentation=man:supervisor(1) file:///usr/share/doc/udp-supervisor/README.md|' \
        "$unit" > "$assets/systemd/$(basename "$unit")"
    if grep -q /usr/local "$assets/systemd/$(basename "$unit")"; then
        log "$unit: a /usr/local path is left in the packaged copy"
        exit 1
    fi
done

mkdir -p "$out"
log "cargo deb ${deb_args[*]}"
deb=$(cargo deb -p supervisor --no-build "${deb_args[@]}" --output "$out" | tail -n 1)
log "built $deb"
echo "$deb"
