#!/usr/bin/env bash
# Build a local Debian bookworm base image (Python 3.11) WITHOUT any image registry:
#   debootstrap --variant=minbase bookworm + python3, python3-venv, ca-certificates,
#   apt caches removed, then `tar | docker import`.
#
# Usage:  docker/build_base.sh [IMAGE]          (default deeplight-base:bookworm)
# Env:    BASE_IMAGE    image name (same as the argument; the argument wins)
#         DEBIAN_MIRROR Debian mirror (default http://deb.debian.org/debian)
#         SUITE         Debian suite (default bookworm: its python3 is 3.11)
#         FORCE=1       rebuild even when the image already exists
#
# Idempotent: does nothing when the image already exists (unless FORCE=1).
# Needs root (debootstrap), debootstrap and a running Docker daemon (.ci/docker.sh sets
# both up). Takes about 80 s on a 2-core machine (most of it downloading/unpacking
# ~90 .debs); the image is ~150 MB.
# Where a registry is reachable, any Python 3.11 image works instead: see docker/README.md.
set -euo pipefail

IMAGE="${1:-${BASE_IMAGE:-deeplight-base:bookworm}}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${SUITE:-bookworm}"
INCLUDE="python3,python3-venv,ca-certificates"

log() { echo "[build_base] $*" >&2; }

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists: skipping (FORCE=1 rebuilds)"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    log "debootstrap needs root (run as root or via sudo)"
    exit 1
fi
command -v debootstrap >/dev/null || { log "debootstrap missing: run .ci/docker.sh (or apt-get install -y debootstrap)"; exit 1; }
docker info >/dev/null 2>&1 || { log "no Docker daemon answers: run .ci/docker.sh"; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/deeplight-base.XXXXXX")"
ROOTFS="$WORK/rootfs"

cleanup() {
    # Never delete through a mount that debootstrap may have left behind (proc, sys, dev).
    if [[ -d "$ROOTFS" ]]; then
        local m
        for m in $(awk -v r="$ROOTFS" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
            umount -l "$m" 2>/dev/null || true
        done
    fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

start=$(date +%s)
log "debootstrap --variant=minbase $SUITE from $MIRROR (include: $INCLUDE)"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    exit 1
}

# Slim down: apt caches and lists, docs we never read, logs. Keep /usr/share/doc/*/copyright.
rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/var/cache/apt/archives/partial/* "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/* "$ROOTFS"/debootstrap \
       "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache
find "$ROOTFS"/usr/share/doc -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
# The host's resolver/hostname must not be baked in: Docker mounts its own at run time.
: >"$ROOTFS"/etc/resolv.conf
echo deeplight >"$ROOTFS"/etc/hostname
# Python must be 3.11 (the project requires >=3.11,<3.12).
pyver="$(chroot "$ROOTFS" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$pyver" == 3.11 ]] || { log "python3 in $SUITE is $pyver, not 3.11"; exit 1; }

log "importing rootfs as $IMAGE"
tar --numeric-owner --xattrs -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE + $INCLUDE" \
    - "$IMAGE" >/dev/null
log "built $IMAGE (python $pyver) in $(( $(date +%s) - start )) s"
docker image ls "$IMAGE" >&2
