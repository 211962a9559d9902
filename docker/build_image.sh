#!/usr/bin/env bash
# Build the deeplight runtime image, with no image registry and (by default) no network in the build.
#
# Usage:  docker/build_image.sh [IMAGE_TAG]             (default deeplight:local)
# Env:    BASE_IMAGE      base image (default deeplight-base:bookworm, built by docker/build_base.sh
#                         when missing; e.g. python:3.11-slim-bookworm where a registry is reachable)
#         CODE_VERSION    value of DEEPLIGHT_CODE_VERSION in the image (default: git commit, +dirty)
#         TORCH_WHEEL     the torch CPU wheel (default /opt/wheels/torch-2.13.0+cpu-cp311-...whl)
#         WHEELHOUSE      all (default): stage every wheel on the host, build with --no-index;
#                         torch: stage only the torch wheel, the build reads the package index
#                         (only where the build can reach one with its own CA certificates)
#         PYTHON          a host Python 3.11 whose pip downloads the wheels (default .venv/bin/python)
#         DOCKER_BUILD_ARGS extra args for `docker build` (e.g. --no-cache)
#
# Steps: 1) base image (skipped when present), 2) wheelhouse docker/.wheelhouse/ (gitignored; re-staged
# only when requirements.lock / the dependency list / the torch wheel change), 3) `docker build -f
# docker/Dockerfile` with the repository root as context, sent as an allow-list tar stream (the
# project's sources, the lock, the Dockerfile and the wheelhouse; never .venv, .git, data, mlruns...),
# so it needs no .dockerignore at the root. Docker's layer cache makes a rebuild with unchanged
# dependencies take seconds. Linux x86_64 hosts only (the wheels are picked for the host).
set -euo pipefail

TAG="${1:-${IMAGE_TAG:-deeplight:local}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-deeplight-base:bookworm}"
TORCH_WHEEL="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
WHEELHOUSE="${WHEELHOUSE:-all}"
WH="$HERE/.wheelhouse"
BUILD_DEPS=("setuptools>=69" "wheel")   # the project's build-system requires (pip's isolated build)

log() { echo "[build_image] $*" >&2; }

docker info >/dev/null 2>&1 || { log "no Docker daemon answers: run .ci/docker.sh"; exit 1; }
case "$WHEELHOUSE" in all|torch) ;; *) log "WHEELHOUSE must be all or torch"; exit 2 ;; esac
[[ -f "$TORCH_WHEEL" ]] || { log "torch CPU wheel not found: $TORCH_WHEEL (set TORCH_WHEEL)"; exit 1; }
[[ "$(basename "$TORCH_WHEEL")" == torch-2.13.0+cpu-* ]] || {
    log "TORCH_WHEEL must be the 2.13.0 CPU build pinned by requirements.lock: $TORCH_WHEEL"; exit 1; }

# One build at a time per checkout (the wheelhouse is shared).
exec 9>"$HERE/.build.lock"
flock 9

# 1) Base image.
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ "$BASE_IMAGE" == deeplight-base:* ]]; then
        bash "$HERE/build_base.sh" "$BASE_IMAGE"
    else
        log "base $BASE_IMAGE not present locally: docker build will pull it from its registry"
    fi
fi

# 2) Wheelhouse.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"
    else PYTHON="$(command -v python3.11 || command -v python3)"; fi
fi
deps="$(cd "$ROOT" && "$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')"
stamp="$( { echo "mode=$WHEELHOUSE"; basename "$TORCH_WHEEL"; printf '%s\n' "$deps" "${BUILD_DEPS[@]}"; cat "$ROOT/requirements.lock"; } | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$WH/.stamp" 2>/dev/null)" != "$stamp" ]]; then
    t0=$(date +%s)
    rm -rf "$WH.new"; mkdir -p "$WH.new"
    # Hard link when on the same filesystem (no 190 MB copy), else copy.
    ln "$TORCH_WHEEL" "$WH.new/" 2>/dev/null || cp "$TORCH_WHEEL" "$WH.new/"
    if [[ "$WHEELHOUSE" == all ]]; then
        "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "PYTHON must be a Python 3.11"'
        log "downloading the locked wheels into docker/.wheelhouse (host pip)"
        printf '%s\n' "$deps" >"$WH.new/.deps.txt"
        # `pip wheel`, not `pip download`: sdist-only packages (kfp-server-api) are built into wheels
        # here, so the image build installs wheels only and needs no compiler. The torch wheel is found
        # in the wheelhouse itself; -c requirements.lock pins torch==2.13.0+cpu: never a CUDA build.
        if ! (cd "$ROOT" && "$PYTHON" -m pip wheel --disable-pip-version-check \
                --wheel-dir "$WH.new" --find-links "$WH.new" \
                -c requirements.lock -r "$WH.new/.deps.txt" "${BUILD_DEPS[@]}") >"$WH.new.log" 2>&1; then
            grep -v 'is ignored: it is neither a file nor a directory' "$WH.new.log" | tail -n 40 >&2
            log "pip wheel failed (full log: $WH.new.log)"
            exit 1
        fi
        rm -f "$WH.new.log"
        rm -f "$WH.new/.deps.txt"
    fi
    ls "$WH.new"/torch-* | grep -v -q -- '+cpu-' && { log "a non-CPU torch wheel was staged"; exit 1; }
    echo "$stamp" >"$WH.new/.stamp"
    rm -rf "$WH"; mv "$WH.new" "$WH"
    log "wheelhouse staged in $(( $(date +%s) - t0 )) s: $(ls "$WH" | wc -l) wheels, $(du -sh "$WH" | cut -f1)"
else
    log "wheelhouse up to date ($(ls "$WH" | wc -l) wheels)"
fi
# Offline build: pip reads the wheelhouse only, and RUN steps get no network at all.
index_args=(--build-arg PIP_INDEX_ARGS=--no-index --network none)
[[ "$WHEELHOUSE" == all ]] || index_args=(--build-arg PIP_INDEX_ARGS=)

# 3) docker build, context = repo root (allow-list).
if [[ -z "${CODE_VERSION:-}" ]]; then
    CODE_VERSION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ "$CODE_VERSION" != unknown ]] && [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        CODE_VERSION="$CODE_VERSION+dirty"
    fi
fi
log "docker build -t $TAG (base $BASE_IMAGE, DEEPLIGHT_CODE_VERSION=$CODE_VERSION)"
t0=$(date +%s)
# shellcheck disable=SC2086
tar -C "$ROOT" -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
        pyproject.toml requirements.lock README.md deeplight components pipelines docker/Dockerfile docker/.wheelhouse \
    | docker build -f docker/Dockerfile -t "$TAG" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg DEEPLIGHT_CODE_VERSION="$CODE_VERSION" \
        "${index_args[@]}" ${DOCKER_BUILD_ARGS:-} -
log "built $TAG in $(( $(date +%s) - t0 )) s"
docker image ls "$TAG" >&2
