#!/usr/bin/env bash
# Make a Docker engine answer on this machine (for tests/test_docker.py and `make image`).
#   - installs Debian's docker.io and debootstrap when missing (apt-get update first; root, no stdin);
#   - starts dockerd in the background when no daemon answers `docker info`, and waits for it
#     (at most DOCKER_WAIT seconds, default 60);
#   - prints, on stdout, two eval-able lines (everything else goes to stderr):
#       DOCKERD_PID=<pid of the daemon>   DOCKERD_STARTED=1 if this script started it, else 0
#     so a caller can stop exactly the daemon it started:
#       eval "$(bash .ci/docker.sh)"; ...; [ "$DOCKERD_STARTED" = 1 ] && kill "$DOCKERD_PID"
# The daemon listens on its unix socket only; published ports (none are used) would bind 127.0.0.1.
# Log: $DOCKERD_LOG (default /var/log/deeplight-dockerd.log).
set -euo pipefail

WAIT="${DOCKER_WAIT:-60}"
LOG="${DOCKERD_LOG:-/var/log/deeplight-dockerd.log}"
log() { echo "[ci/docker] $*" >&2; }

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { log "need root to install ${missing[*]}"; exit 1; }
    log "installing $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null >&2
    apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        $(printf '%s\n' "${missing[@]}" | sort -u) </dev/null >&2
fi

if docker info >/dev/null 2>&1; then
    pid="$(cat /var/run/docker.pid 2>/dev/null || pgrep -x dockerd | head -n1 || true)"
    log "a Docker daemon already answers (pid ${pid:-unknown})"
    echo "DOCKERD_PID=${pid:-}"
    echo "DOCKERD_STARTED=0"
    exit 0
fi

[[ $(id -u) == 0 ]] || { log "no Docker daemon answers and only root can start one"; exit 1; }
log "starting dockerd (log: $LOG)"
# setsid + nohup: the daemon outlives this script (CI calls it, then runs the tests).
setsid nohup dockerd --ip 127.0.0.1 </dev/null >>"$LOG" 2>&1 &
pid=$!
deadline=$((SECONDS + WAIT))
until docker info >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
        log "dockerd exited; last log lines:"; tail -n 20 "$LOG" >&2; exit 1
    fi
    if ((SECONDS >= deadline)); then
        log "dockerd did not answer within ${WAIT}s; stopping it; last log lines:"; tail -n 20 "$LOG" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    sleep 1
done
log "dockerd answers (pid $pid, after $((SECONDS)) s)"
echo "DOCKERD_PID=$pid"
echo "DOCKERD_STARTED=1"
