# Timing and logging helpers shared by the scripts under scripts/. Source it after setting NAME (the log prefix):
#   NAME=my-script; source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"
# shellcheck shell=bash

_us() { local t=${EPOCHREALTIME//[.,]/}; echo $((10#$t)); }                              # microseconds now
_el() { local d=$(( ($(_us) - $1) / 100000 )); printf '%d.%ds' $((d / 10)) $((d % 10)); }  # seconds since $1
T_START=$(_us)
log() { printf '[%s %s] %s\n' "$NAME" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
step() { # step "description" cmd...  -- runs cmd, logs the duration
  local desc=$1 t; shift; t=$(_us)
  log "$desc ..."
  "$@"
  log "$desc: done in $(_el "$t")"
}
