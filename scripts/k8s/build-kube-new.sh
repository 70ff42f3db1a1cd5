#!/usr/bin/env bash
# Build a current apiextensions-apiserver (k8s 1.36.x: CRDs with CEL x-kubernetes-validations, strict field validation,
# server-side apply) and etcd 3.5 from Debian SID packages. It is served behind the 1.20.2 kube-apiserver's aggregator
# (see start-control-plane.sh). A full kube-apiserver newer than 1.20 cannot be built from Debian (the newer `kubernetes`
# source packages are repacked to kubectl only).
#
#   scripts/k8s/build-kube-new.sh     -> $MS2MG_CACHE/k8s-new/{apiextensions-apiserver,etcd,etcdctl,VERSION}
#
# Only `apt-get download` + `dpkg-deb -x` into a scratch dir (private apt state for sid; /etc/apt untouched, nothing
# installed). About 0.3 GB download and ~4 GB scratch disk, deleted at the end (KEEP_WORK=1 keeps it).
# sid cannot be pinned (old versions disappear from the mirror), so the script takes whatever sid has and the result
# MUST be cached: never rebuild when $MS2MG_CACHE/k8s-new exists (MS2MG_REBUILD=1 forces it).
#
# Env: MS2MG_CACHE (default /var/cache/ms2mg), MS2MG_REBUILD=1, TMPDIR, KEEP_WORK=1,
#      MS2MG_GO_PKG (e.g. golang-1.26; default: the one sid's golang-go depends on).
set -euo pipefail

CACHE=${MS2MG_CACHE:-/var/cache/ms2mg}
OUT=$CACHE/k8s-new
LOGDIR=$CACHE/logs
NAME=build-kube-new

source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"

if [[ -z ${MS2MG_REBUILD:-} && -x $OUT/apiextensions-apiserver && -x $OUT/etcd && -x $OUT/etcdctl && -s $OUT/VERSION ]]
then
  log "cached: $OUT ($(head -1 "$OUT/VERSION")), nothing to do ($(_el "$T_START"))"
  exit 0
fi

for c in apt-get apt-cache dpkg-deb xargs; do command -v "$c" >/dev/null || die "missing tool: $c"; done
mkdir -p "$CACHE" "$LOGDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ms2mg-kubenew.XXXXXX")
BUILD_LOG=$LOGDIR/$NAME.log
cleanup() {
  local rc=$?
  if [[ -n ${KEEP_WORK:-} ]]; then log "keeping scratch dir $WORK"; else rm -rf "$WORK" "$OUT.tmp"; fi
  if ((rc != 0)); then log "FAILED (rc=$rc) after $(_el "$T_START"); build log: $BUILD_LOG"; fi
}
trap cleanup EXIT
: >"$BUILD_LOG"
log "building apiextensions-apiserver + etcd from Debian sid into $OUT (scratch: $WORK, log: $BUILD_LOG)"

A=$WORK/apt
X=$WORK/x
mkdir -p "$A"/{lists/partial,cache,archives/partial} "$WORK/debs" "$X" "$WORK/gocache"
cat >"$A/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
EOF
APT_OPTS=(-oDir::State::Lists="$A/lists" -oDir::Etc::SourceList="$A/sources.list" -oDir::Etc::SourceParts=/dev/null
  -oDir::Cache="$A/cache" -oDir::Cache::archives="$A/archives" -oAPT::Sandbox::User=root -oDebug::NoLocking=1)

apt_update() { apt-get "${APT_OPTS[@]}" update -qq >>"$BUILD_LOG" 2>&1; }
step "apt-get update (private sid lists, ~25 MB)" apt_update

GO_PKG=${MS2MG_GO_PKG:-$(apt-cache "${APT_OPTS[@]}" depends golang-go 2>/dev/null |
  sed -n 's/.*Depends: \(golang-1\.[0-9]*\)-go.*/\1/p' | head -1)}
[[ -n $GO_PKG ]] || die "cannot determine sid's Go version (apt-cache depends golang-go)"

fetch() {
  # closure of the Go source packages k8s.io/apiextensions-apiserver needs (all arch:all, under /usr/share/gocode)
  apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances golang-k8s-apiextensions-apiserver-dev 2>>"$BUILD_LOG" |
    grep -E '^golang-.*-dev$' | sort -u >"$WORK/godev.txt"
  (($(wc -l <"$WORK/godev.txt") > 50)) || die "dependency closure looks wrong: $(wc -l <"$WORK/godev.txt") packages"
  cd "$WORK/debs"
  # shellcheck disable=SC2046
  apt-get "${APT_OPTS[@]}" download -qq $(cat "$WORK/godev.txt") "$GO_PKG-go" "$GO_PKG-src" etcd-server etcd-client \
    >>"$BUILD_LOG" 2>&1 || { tail -20 "$BUILD_LOG" >&2; die "apt-get download failed"; }
  log "  $(find . -name '*.deb' | wc -l) packages, $(du -sh . | cut -f1)"
}
step "download $GO_PKG, the Go library closure (~315 packages) and etcd (~280 MB)" fetch

extract() {
  # shellcheck disable=SC2016 # $X is passed as $0 of the inner shell
  find "$WORK/debs" -name '*.deb' -print0 | xargs -0 -n 16 -P "$(nproc)" sh -c \
    'for d in "$@"; do dpkg-deb -x "$d" "$0" || exit 255; done' "$X"
}
step "unpack packages (dpkg-deb -x, ~2.3 GB)" extract

GOROOT_DIR=$(echo "$X"/usr/lib/go-1.*)
[[ -x $GOROOT_DIR/bin/go ]] || die "no go binary under $X/usr/lib"
APIEXT_DEB=$(echo "$WORK"/debs/golang-k8s-apiextensions-apiserver-dev_*.deb)
APIEXT_VER=$(dpkg-deb -f "$APIEXT_DEB" Version)          # e.g. 0.36.4-1
V=${APIEXT_VER%%-*}
V=v1.${V#0.}                                              # 0.36.4 -> v1.36.4
MINOR=$(cut -d. -f2 <<<"$V")
GO_VERSION=$("$GOROOT_DIR/bin/go" version | cut -d' ' -f3)

build() {
  cd "$WORK"
  # GOPATH mode against /usr/share/gocode, like dh-golang. Without the version ldflags the server reports
  # v0.0.0-master+$Format:%H$ and kubectl cannot parse it.
  env PATH="$GOROOT_DIR/bin:$PATH" GOROOT="$GOROOT_DIR" GOPATH="$X/usr/share/gocode" GO111MODULE=off \
    GOTOOLCHAIN=local GOPROXY=off CGO_ENABLED=0 GOCACHE="$WORK/gocache" GOFLAGS= HOME="$WORK" \
    go build -trimpath -o "$OUT.tmp/apiextensions-apiserver" -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=$V -X k8s.io/component-base/version.gitMajor=1 \
      -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/component-base/version.gitTreeState=clean" \
    k8s.io/apiextensions-apiserver >>"$BUILD_LOG" 2>&1 || { tail -40 "$BUILD_LOG" >&2; die "go build failed"; }
}
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
step "go build apiextensions-apiserver $V with $GO_VERSION (~2-3 min on 2 cores)" build

cp "$X/usr/bin/etcd" "$X/usr/bin/etcdctl" "$OUT.tmp/"
V_ETCD=$("$OUT.tmp/etcd" --version | sed -n 's/^etcd Version: //p')
"$OUT.tmp/apiextensions-apiserver" --help >/dev/null 2>&1 || die "the built apiextensions-apiserver does not run"
{
  echo "apiextensions-apiserver $V"
  echo "etcd $V_ETCD"
  echo "source: Debian sid golang-k8s-apiextensions-apiserver-dev $APIEXT_VER, etcd-server $(dpkg-deb -f "$WORK"/debs/etcd-server_*.deb Version)"
  echo "go: $GO_VERSION ($GO_PKG from sid)"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(_el "$T_START")"
} >"$OUT.tmp/VERSION"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "done in $(_el "$T_START"): $OUT ($(du -sh "$OUT" | cut -f1)) -- apiextensions-apiserver $V, etcd $V_ETCD"
