#!/usr/bin/env bash
# Stop a control plane started by start-control-plane.sh, by the PIDs recorded in its work dir, in this order:
#   watchdog, kube-controller-manager, apiextensions-apiserver, kube-apiserver (waited for), etcd (last: with etcd gone
#   first the apiserver never exits).
# kube-controller-manager goes FIRST: its watches on custom resources are proxied by the 1.20 aggregator to the 1.36
# server, and while they are open kube-apiserver 1.20 waits its full 60 s shutdown timeout (apiext ~15 s) -- measured.
# Any other client still watching CRs (a kopf operator that was not stopped) has the same effect, hence the SIGKILL
# after a short grace period: harmless for a throw-away test cluster. Normal teardown takes ~2-3 s.
# SIGTERM first, SIGKILL after a grace period. A PID whose process is not the expected program (PID reuse) is left alone.
# Idempotent: missing/stale PID files are fine.
#
# Usage: stop-control-plane.sh [--only NAME] [--purge] WORKDIR
#   --only NAME   stop a single component (watchdog|apiext|apiserver|kcm|etcd)
#   --purge       also delete the etcd data and kubectl cache (logs, certs and kubeconfig stay for debugging)
set -euo pipefail

NAME=k8s-stop
source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"

ONLY="" PURGE=0
while (($#)); do
  case $1 in
    --only) ONLY=${2:?--only needs a name}; shift ;;
    --purge) PURGE=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    -*) log "unknown option $1"; exit 2 ;;
    *) break ;;
  esac
  shift
done
W=${1:?usage: stop-control-plane.sh [--only NAME] [--purge] WORKDIR}
[[ -d $W ]] || { log "$W does not exist, nothing to stop"; exit 0; }

# stop NAME EXPECTED_PROGRAM GRACE_SECONDS
stop() {
  local name=$1 prog=$2 grace=$3 pidfile=$W/$1.pid pid t
  [[ -z $ONLY || $ONLY == "$name" ]] || return 0
  [[ -s $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if [[ ! $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null; then rm -f "$pidfile"; return 0; fi
  if [[ $pid == "$$" ]]; then rm -f "$pidfile"; return 0; fi     # the watchdog runs this script via exec
  if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$prog"; then
    log "$name: pid $pid is not $prog any more, leaving it alone"
    rm -f "$pidfile"
    return 0
  fi
  t=$(_us)
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  while kill -0 "$pid" 2>/dev/null; do
    # a zombie (reaped later by init) counts as stopped
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
    if ((SECONDS >= deadline)); then
      log "$name (pid $pid) still running after ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.1
  done
  rm -f "$pidfile"
  log "stopped $name (pid $pid) in $(_el "$t")"
}

stop watchdog bash 5
stop kcm kube-controller-manager 10
stop apiext apiextensions-apiserver 10
stop apiserver kube-apiserver 15
stop etcd etcd 10

if ((PURGE)) && [[ -z $ONLY ]]; then
  rm -rf "$W/etcd-data" "$W/kubectl-cache"
fi
[[ -n $ONLY ]] || log "control plane in $W stopped in $(_el "$T_START")"
