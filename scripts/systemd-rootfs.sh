#!/usr/bin/env bash
# Builds, once, the root filesystem in which the tests boot a systemd newer than the
# host's: this machine's Debian release (debootstrap, minimal) with systemd from its
# backports suite (bookworm-backports carries 254), plus python3 for the Python worker.
# The tests boot it read-only under a tmpfs overlay (tests/src/systemd_container.rs),
# so one copy serves every test and stays clean.
#
#   sudo ./scripts/systemd-rootfs.sh          # prints the rootfs path; called by bootstrap.sh
#
# Idempotent: a complete rootfs (marked by its `.recipe` file, which must match this
# script's recipe) is left alone. A run that fails half-way leaves only a `.tmp-*`
# directory, removed by the next run. Packages come from the mirror the host's apt
# already uses (nothing else is contacted). Takes about two minutes and 300 MB once.
# The place: $UDP_SUPERVISOR_CACHE (default /var/cache/udp-supervisor), the same
# default as the tests use.
set -euo pipefail

log() { printf 'systemd-rootfs: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (debootstrap, chroot)"
    exit 2
fi

cache=${UDP_SUPERVISOR_CACHE:-/var/cache/udp-supervisor}
# shellcheck source=/dev/null
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || { log "no VERSION_CODENAME in /etc/os-release"; exit 1; }
# Everything that decides the content; a change rebuilds the rootfs.
packages="systemd,systemd-sysv,python3,iproute2"
backports="systemd systemd-sysv libsystemd0 libsystemd-shared"
recipe="debootstrap minbase $codename +$packages; $codename-backports: $backports"
dest=$cache/$codename-systemd-backports

if [ -f "$dest/.recipe" ] && [ "$(cat "$dest/.recipe")" = "$recipe" ]; then
    echo "$dest"
    exit 0
fi

# The host's own mirror for the main suite: the first `URL <codename>/main` apt knows.
mirror=$(apt-cache policy | awk -v s="$codename/main" '$3 == s { print $2; exit }')
[ -n "$mirror" ] || { log "apt has no source for $codename/main (see /etc/apt/sources.list*)"; exit 1; }

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

mkdir -p "$cache"
rm -rf "$cache"/.tmp-*
tmp=$(mktemp -d "$cache/.tmp-XXXXXX")
log "debootstrap $codename from the host's mirror into $tmp (about two minutes)"
# In a private mount namespace: whatever debootstrap mounts in the target (/proc,
# /sys) goes away with it, even when it fails half-way.
unshare --mount --propagation private \
    debootstrap --variant=minbase --include="$packages" "$codename" "$tmp" "$mirror" \
    >"$tmp.log" 2>&1 || { tail -20 "$tmp.log" >&2; exit 1; }

log "systemd from $codename-backports"
echo "deb $mirror $codename-backports main" >"$tmp/etc/apt/sources.list.d/backports.list"
# The host's settings for reaching that mirror apply inside too: a proxy, or a
# snapshot mirror whose Release files are past Valid-Until.
apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy) ' \
    >"$tmp/etc/apt/apt.conf.d/00host-acquire" || true
cp /etc/resolv.conf "$tmp/etc/resolv.conf"
# A private mount namespace, so /proc in the chroot goes away with it whatever happens.
unshare --mount --propagation private sh -euc '
    mount -t proc proc "$1/proc"
    chroot "$1" sh -euc "
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends -t $2-backports $3
        apt-get clean
        rm -rf /var/lib/apt/lists/*"
' sh "$tmp" "$codename" "$backports" >>"$tmp.log" 2>&1 || { tail -20 "$tmp.log" >&2; exit 1; }

# Each container writes its own machine-id; nothing is enabled that the tests do not
# start themselves (timers would only add noise).
: >"$tmp/etc/machine-id"
rm -f "$tmp/etc/resolv.conf" "$tmp"/etc/systemd/system/timers.target.wants/*
version=$(chroot "$tmp" systemctl --version | awk 'NR == 1 { print $2 }')
if [ "${version:-0}" -lt 253 ]; then
    log "$codename-backports gave systemd $version, not 253 or newer"
    exit 1
fi
echo "$recipe" >"$tmp/.recipe"
rm -rf "$dest"
mv "$tmp" "$dest"
rm -f "$tmp.log"
log "systemd $version in $dest ($(du -sh "$dest" | cut -f1))"
echo "$dest"
