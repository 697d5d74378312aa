#!/usr/bin/env bash
# Installs what building the eBPF side needs, only when it is missing.
# Idempotent: a second run on a ready machine does nothing but check.
#   - the nightly toolchain's rust-src (for -Z build-std=core on bpfel-unknown-none)
#   - LLVM 22's development package (bpf-linker links against libLLVM 22)
#   - bpf-linker 0.13.0 built against that LLVM
#   - cargo-machete 0.9.2, for scripts/test.sh's unused-dependency check
#   - cargo-deb 3.8.0, for scripts/package.sh (the Debian package)
#   - systemd-nspawn (systemd-container, pinned to the host's systemd version) and a
#     cached rootfs with a newer systemd (scripts/systemd-rootfs.sh), for the tests
#     that run the unit files under a real systemd as PID 1
# docs/toolchain.md says why these versions; change them there and here together.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
CARGO_MACHETE_VERSION=0.9.2
CARGO_DEB_VERSION=3.8.0
LLVM_MAJOR=22
LLVM_PREFIX=/usr/lib/llvm-${LLVM_MAJOR}

log() { printf 'bootstrap: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages, and the supervisor needs CAP_BPF/CAP_NET_ADMIN)"
    exit 2
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    log "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
fi

if [ ! -x "${LLVM_PREFIX}/bin/llvm-config" ] || ! dpkg -s "libpolly-${LLVM_MAJOR}-dev" >/dev/null 2>&1; then
    log "installing llvm-${LLVM_MAJOR}-dev"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "llvm-${LLVM_MAJOR}-dev" "libpolly-${LLVM_MAJOR}-dev" >/dev/null
fi

# iproute2 for the tests' network namespaces; python3 for the socket-activation example.
for tool in ip python3; do
    if ! command -v "$tool" >/dev/null; then
        log "missing $tool"; export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq; apt-get install -y -qq iproute2 python3 >/dev/null
    fi
done

# bpftool for docs/selector-cost.md's instruction counts (`bpftool prog dump xlated`).
if ! command -v bpftool >/dev/null && [ ! -x /usr/sbin/bpftool ]; then
    log "missing bpftool"; export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq; apt-get install -y -qq bpftool >/dev/null
fi

if ! command -v bpf-linker >/dev/null || ! bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"; then
    log "building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_MAJOR} (about two minutes)"
    LLVM_SYS_221_PREFIX="${LLVM_PREFIX}" PATH="${LLVM_PREFIX}/bin:${PATH}" \
        cargo install bpf-linker --locked --version "${BPF_LINKER_VERSION}" \
        --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

if ! cargo machete --version 2>/dev/null | grep -qx "${CARGO_MACHETE_VERSION}"; then
    log "installing cargo-machete ${CARGO_MACHETE_VERSION}"
    cargo install cargo-machete --locked --version "${CARGO_MACHETE_VERSION}"
fi

if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb ${CARGO_DEB_VERSION}"; then
    log "installing cargo-deb ${CARGO_DEB_VERSION}"
    cargo install cargo-deb --locked --version "${CARGO_DEB_VERSION}"
fi

# systemd-nspawn boots a real systemd for tests/tests/systemd_real.rs. Pinned to the
# installed systemd's version: an unpinned install would upgrade the host's systemd,
# libsystemd0 and udev along with it.
if ! command -v systemd-nspawn >/dev/null; then
    systemd_version=$(dpkg-query -W -f='${Version}' systemd)
    log "installing systemd-container ${systemd_version}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "systemd-container=${systemd_version}" >/dev/null
fi
# The same tests under a newer systemd (Type=notify-reload needs 253): built once
# (about two minutes, debootstrap from the host's own mirror), then cached.
bash "$(dirname "$0")/systemd-rootfs.sh" >/dev/null

# tests/tests/metrics.rs scrapes /metrics with curl and Python's urllib, and parses
# it with the OpenMetrics parser of PyPI's prometheus-client.
if ! command -v curl >/dev/null; then
    log "installing curl"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq curl >/dev/null
fi
if ! python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; then
    log "installing the python prometheus-client (for the metrics tests)"
    python3 -m pip install -q prometheus-client 2>/dev/null \
        || python3 -m pip install -q --break-system-packages prometheus-client
fi

# tests/tests/bind_handoff.rs wraps a real, unmodified DNS server that binds its
# own UDP socket (unbound) and loads it with dnsperf. The package's own service is
# not wanted: where systemd runs, it is stopped and disabled again.
if ! command -v unbound >/dev/null || ! command -v dnsperf >/dev/null; then
    log "installing unbound and dnsperf (for the bind handoff tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends unbound dnsperf >/dev/null
    if [ -d /run/systemd/system ]; then
        systemctl disable --now unbound.service >/dev/null 2>&1 || true
    fi
fi

# bpffs: the supervisor mounts it itself when missing; the tests need it too.
if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
