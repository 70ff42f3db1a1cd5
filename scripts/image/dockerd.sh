#!/usr/bin/env bash
# A hand-started dockerd for CI image builds (no systemd, no iptables, no bridge; see docs/image.md).
#
#   scripts/image/dockerd.sh start    start it (installs Debian's docker.io first if dockerd is missing) and wait
#                                     until it answers; if it is already running, say so and do nothing
#   scripts/image/dockerd.sh stop     stop the dockerd this script started (SIGTERM by pidfile, SIGKILL after 30 s)
#   scripts/image/dockerd.sh status   rc 0 if it is running and answering, 1 otherwise
#   scripts/image/dockerd.sh env      print `export DOCKER_HOST=...` (eval it to use the daemon by hand)
#
# Containers can only use `--network=host` or `--network=none` (`--bridge=none`): pass `--network=host` to
# `docker build` and `docker run`.
#
# Env:
#   MS2MG_CACHE        cache root (default /var/cache/ms2mg); images and build cache live in $MS2MG_CACHE/docker,
#                      so base images and layers survive between CI runs on the same machine
#   MS2MG_DOCKER_RUN   exec root, pidfile and socket (default /run/ms2mg-docker; must be a short path: the socket
#                      path has to fit in 108 bytes)
#   MS2MG_NO_APT=1     do not apt-get install docker.io when dockerd is missing (fail instead)
# Must run as root (dockerd needs it).
set -euo pipefail

CACHE=${MS2MG_CACHE:-/var/cache/ms2mg}
DATA=$CACHE/docker
RUN=${MS2MG_DOCKER_RUN:-/run/ms2mg-docker}
PIDFILE=$RUN/dockerd.pid
SOCK=$RUN/docker.sock
LOG=$CACHE/logs/dockerd.log
NAME=dockerd

source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"

export DOCKER_HOST=unix://$SOCK

pid_alive() { [[ -s $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
answering() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

ensure_installed() {
  command -v dockerd >/dev/null && command -v docker >/dev/null && return 0
  [[ ${MS2MG_NO_APT:-} != 1 ]] || die "dockerd/docker not found and MS2MG_NO_APT=1 (apt-get install docker.io)"
  command -v apt-get >/dev/null || die "dockerd not found and no apt-get to install Debian's docker.io"
  local t; t=$(_us)
  log "installing Debian docker.io (apt-get) ..."
  # the package's postinst tries to start the systemd service; there is no systemd here, that is fine
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >/dev/null; } ||
    die "apt-get install docker.io failed"
  log "docker.io installed in $(_el "$t")"
}

start() {
  [[ $(id -u) == 0 ]] || die "dockerd needs root"
  if pid_alive && answering; then
    log "already running (pid $(cat "$PIDFILE"), $DOCKER_HOST); not starting another"
    return 0
  fi
  pid_alive && die "dockerd pid $(cat "$PIDFILE") is alive but does not answer on $SOCK; stop it first: $0 stop"
  ensure_installed
  mkdir -p "$DATA" "$RUN" "$(dirname "$LOG")"
  rm -f "$PIDFILE" "$SOCK"
  local t; t=$(_us)
  # --iptables/--ip-forward/--ip-masq=false + --bridge=none: no host network changes (the CI VM has no iptables
  # rules to spare and no bridge module); builds and containers use --network=host.
  # setsid: own session, so it survives the caller's job control and does not get the terminal's signals.
  setsid /usr/sbin/dockerd \
    --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    --data-root "$DATA" --exec-root "$RUN/exec" --pidfile "$PIDFILE" \
    --host "$DOCKER_HOST" --log-level warn \
    </dev/null >>"$LOG" 2>&1 &
  local launcher=$!
  for _ in $(seq 1 600); do
    if answering; then
      log "ready in $(_el "$t"): pid $(cat "$PIDFILE"), $DOCKER_HOST, data root $DATA" \
          "(storage driver $(docker info --format '{{.Driver}}' 2>/dev/null), log $LOG)"
      return 0
    fi
    kill -0 "$launcher" 2>/dev/null || { tail -n 30 "$LOG" >&2; die "dockerd exited during start (log $LOG)"; }
    sleep 0.1
  done
  tail -n 30 "$LOG" >&2
  kill "$launcher" 2>/dev/null || true
  die "dockerd did not answer within 60 s (log $LOG)"
}

stop() {
  if ! [[ -s $PIDFILE ]]; then
    log "not running (no $PIDFILE)"
    return 0
  fi
  local pid; pid=$(cat "$PIDFILE")
  if ! kill -0 "$pid" 2>/dev/null; then
    log "not running (stale pidfile, pid $pid)"
    rm -f "$PIDFILE"
    return 0
  fi
  # only ever signal the pid from our own pidfile, and only if it really is a dockerd
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]] || die "pid $pid from $PIDFILE is not dockerd; not killing it"
  local t; t=$(_us)
  kill -TERM "$pid"
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "dockerd pid $pid ignored SIGTERM for 30 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # dockerd leaves its default network namespace mounted (nsfs on $RUN/exec/netns/default): unmount what is ours
  { findmnt -rn -o TARGET | grep -F "$RUN/" | sort -r || true; } | while read -r m; do umount "$m" 2>/dev/null || true; done
  rm -f "$PIDFILE" "$SOCK"
  log "stopped pid $pid in $(_el "$t")"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) pid_alive && answering ;;
  env) echo "export DOCKER_HOST=$DOCKER_HOST" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
