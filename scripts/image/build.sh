#!/usr/bin/env bash
# Build both images (targets `operator` and `converter` of the Dockerfile) on the CI daemon and report their sizes.
# CI has no registry access, so by default this builds on the debootstrap base (make-base.sh, cached) and feeds the
# converter's CPU torch from the local wheel directory through a throwaway HTTP index on 127.0.0.1 instead of the
# PyTorch CPU index. See docs/image.md.
#
# Needs: a running daemon (scripts/image/dockerd.sh start); root for make-base.sh the first time.
# Env:
#   MS2MG_IMAGE_TAG      tag of both images (default dev): localhost/ms2mg-{converter,operator}:TAG
#   MS2MG_IMAGE_BASE     BASE build argument (default: localhost/ms2mg-base:bookworm, made by make-base.sh if
#                        missing; set it to e.g. python:3.11-slim where a registry is reachable)
#   MS2MG_TORCH_WHEELS   directory with the torch CPU wheel(s) to serve (default /opt/wheels if it has one); set it
#                        to "none" to use the Dockerfile's TORCH_INDEX_URL (the PyTorch CPU index)
#   MS2MG_TORCH_INDEX_PORT  127.0.0.1 port of that index while building (default 38917; it is part of the torch
#                        layer's cache key, so keep it fixed)
#   MS2MG_IMAGE_TARGETS  default "operator converter"
#   MS2MG_IMAGE_PRUNE    1 (default): tag the intermediate stages (localhost/ms2mg-stage:STAGE) and prune dangling
#                        images afterwards, so the daemon's data root does not grow with every changed build
#   MS2MG_CACHE          cache root (default /var/cache/ms2mg): build logs go to $MS2MG_CACHE/logs/
# Output (stdout): one line per image: `image NAME size_bytes=N size=N MB`
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${MS2MG_CACHE:-/var/cache/ms2mg}
TAG=${MS2MG_IMAGE_TAG:-dev}
DEFAULT_BASE=localhost/ms2mg-base:bookworm
BASE=${MS2MG_IMAGE_BASE:-$DEFAULT_BASE}
read -r -a TARGETS <<<"${MS2MG_IMAGE_TARGETS:-operator converter}"
LOGS=$CACHE/logs
NAME="image-build"

source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"
mb() { awk '{printf "%.0f MB", $1/1e6}' <<<"$1"; }

eval "$("$HERE/dockerd.sh" env)"
"$HERE/dockerd.sh" status || die "dockerd is not running: scripts/image/dockerd.sh start"
mkdir -p "$LOGS"

if [[ $BASE == "$DEFAULT_BASE" ]]; then
  MS2MG_BASE_IMAGE=$BASE "$HERE/make-base.sh"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ms2mg-image.XXXXXX")
SERVER_PID=""
cleanup() {
  [[ -z $SERVER_PID ]] || { kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null || true; }
  rm -rf "$WORK"
}
trap cleanup EXIT

args=(--network=host --force-rm --build-arg "BASE=$BASE" --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")")
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  # the commit's date, not now: a rebuild of the same commit then reuses every layer, labels included
  args+=(--build-arg "REVISION=$(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || echo -dirty)"
         --build-arg "CREATED=$(git -C "$ROOT" log -1 --format=%cI)")
fi

# CPU torch from a local wheel: a PEP 503 "simple" index (directory listing) served on 127.0.0.1 while building.
# The build runs with --network=host, so the converter-deps stage reaches it at that address.
WHEELS=${MS2MG_TORCH_WHEELS:-}
if [[ -z $WHEELS ]] && compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then WHEELS=/opt/wheels; fi
if [[ " ${TARGETS[*]} " == *" converter "* && -n $WHEELS && $WHEELS != none ]]; then
  compgen -G "$WHEELS/torch-*.whl" >/dev/null || die "no torch-*.whl in MS2MG_TORCH_WHEELS=$WHEELS"
  mkdir -p "$WORK/index/torch"
  for w in "$WHEELS"/torch-*.whl; do ln "$w" "$WORK/index/torch/" 2>/dev/null || ln -s "$w" "$WORK/index/torch/"; done
  python3 - "$WORK/index" "$WORK/port" "${MS2MG_TORCH_INDEX_PORT:-38917}" <<'PY' &
import functools, http.server, sys
root, portfile, port = sys.argv[1:]
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass
handler = functools.partial(Quiet, directory=root)
try:  # a fixed port keeps TORCH_INDEX_URL, and so the cache key of the torch layer, the same between builds
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), handler)
except OSError as e:
    print(f"port {port} is taken ({e}); using a free one: the torch layer will be rebuilt", file=sys.stderr)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
with open(portfile + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os; os.rename(portfile + ".tmp", portfile)
server.serve_forever()
PY
  SERVER_PID=$!
  for _ in $(seq 1 100); do [[ -s $WORK/port ]] && break; sleep 0.05; done
  [[ -s $WORK/port ]] || die "the local torch index did not start"
  args+=(--build-arg "TORCH_INDEX_URL=http://127.0.0.1:$(cat "$WORK/port")/")
  log "serving $(cd "$WORK/index/torch" && echo torch-*.whl) from $WHEELS as http://127.0.0.1:$(cat "$WORK/port")/"
fi

# DOCKER_BUILDKIT=0: Debian's daemon has BuildKit, but a newer docker CLI without the buildx plugin cannot use it;
# the Dockerfile needs nothing BuildKit-only.
for target in "${TARGETS[@]}"; do
  image=localhost/ms2mg-$target:$TAG
  t=$(_us)
  log "docker build --target $target -t $image (BASE=$BASE) ..."
  if ! DOCKER_BUILDKIT=0 docker build "${args[@]}" --target "$target" -t "$image" "$ROOT" >"$LOGS/image-build-$target.log" 2>&1; then
    tail -n 40 "$LOGS/image-build-$target.log" >&2
    if grep -q "No matching distribution found for .*(from ms2mg\[" "$LOGS/image-build-$target.log"; then
      log "the lock lacks a dependency of pyproject.toml: run scripts/image/lock.sh and commit scripts/image/requirements-*.txt"
    fi
    die "building $image failed (log $LOGS/image-build-$target.log)"
  fi
  steps=$(grep -c '^Step ' "$LOGS/image-build-$target.log" || true)
  ran=$(grep -c -- '---> Running in' "$LOGS/image-build-$target.log" || true)
  log "built $image in $(_el "$t") ($steps steps, $ran executed, the rest cached; log $LOGS/image-build-$target.log)"
done

# Keep the cache bounded on a long-lived CI machine: tag the intermediate stages (cached, ~1 s each) so they are not
# "dangling", then prune what is: images replaced by this build and their now unused layers.
if [[ ${MS2MG_IMAGE_PRUNE:-1} == 1 ]]; then
  t=$(_us)
  stages=(tools wheel operator-deps operator-app)
  [[ " ${TARGETS[*]} " != *" converter "* ]] || stages+=(converter-deps converter-app)
  for stage in "${stages[@]}"; do
    DOCKER_BUILDKIT=0 docker build "${args[@]}" --target "$stage" -t "localhost/ms2mg-stage:$stage" "$ROOT" \
      >"$LOGS/image-build-stage.log" 2>&1 || { tail -n 20 "$LOGS/image-build-stage.log" >&2; die "tagging stage $stage failed"; }
  done
  docker container prune -f >/dev/null 2>&1 || true  # stopped containers (this daemon is private to these scripts)
  reclaimed=$(docker image prune -f 2>/dev/null | sed -n 's/^Total reclaimed space: //p')
  log "pruned dangling images (${reclaimed:-0B}) in $(_el "$t")"
fi

base_size=$(docker image inspect --format '{{.Size}}' "$BASE")
for target in "${TARGETS[@]}"; do
  image=localhost/ms2mg-$target:$TAG
  size=$(docker image inspect --format '{{.Size}}' "$image")
  echo "image $image size_bytes=$size size=$(mb "$size") (base $BASE $(mb "$base_size"), +$(mb $((size - base_size))))"
done
log "done in $(_el "$T_START")"
