#!/usr/bin/env bash
# Build kube-apiserver + kube-controller-manager 1.20.2 from Debian bookworm's `kubernetes` SOURCE package
# (Debian only ships kubectl from it, but the orig tarball is the full tree with vendor/).
#
#   scripts/k8s/build-kube-1.20.sh            -> $MS2MG_CACHE/k8s-1.20.2/{kube-apiserver,kube-controller-manager,VERSION}
#
# Nothing is installed into the system and /etc/apt is not touched: a private apt state (bookworm deb + deb-src) is used,
# Go 1.19, rsync and the two replacement Go libraries are unpacked with `dpkg -x` into a scratch dir that is deleted at
# the end (set KEEP_WORK=1 to keep it). Needs: apt-get, dpkg-deb, make, patch, tar, xz, network access to deb.debian.org.
#
# Env: MS2MG_CACHE (default /var/cache/ms2mg), MS2MG_REBUILD=1 (ignore the cache), TMPDIR, KEEP_WORK=1.
# Measured on a 2-core CI machine: see docs/k8s-testing.md.
set -euo pipefail

K8S_VERSION=1.20.2
GO_PKG=golang-1.19                 # bookworm's default Go, the version Debian builds this source with
CACHE=${MS2MG_CACHE:-/var/cache/ms2mg}
OUT=$CACHE/k8s-$K8S_VERSION
LOGDIR=$CACHE/logs
NAME=build-kube-1.20

source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"

if [[ -z ${MS2MG_REBUILD:-} && -x $OUT/kube-apiserver && -x $OUT/kube-controller-manager && -s $OUT/VERSION ]]; then
  log "cached: $OUT ($(head -1 "$OUT/VERSION")), nothing to do ($(_el "$T_START"))"
  exit 0
fi

for c in apt-get dpkg-deb make patch tar xz; do command -v "$c" >/dev/null || die "missing tool: $c"; done
mkdir -p "$CACHE" "$LOGDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ms2mg-kube120.XXXXXX")
BUILD_LOG=$LOGDIR/$NAME.log
cleanup() {
  local rc=$?
  if [[ -n ${KEEP_WORK:-} ]]; then log "keeping scratch dir $WORK"; else rm -rf "$WORK" "$OUT.tmp"; fi
  if ((rc != 0)); then log "FAILED (rc=$rc) after $(_el "$T_START"); build log: $BUILD_LOG"; fi
}
trap cleanup EXIT
: >"$BUILD_LOG"
log "building Kubernetes $K8S_VERSION server binaries into $OUT (scratch: $WORK, log: $BUILD_LOG)"

# --- private apt state: bookworm deb + deb-src, leaves /etc/apt and /var/lib/apt alone -----------------------------
A=$WORK/apt
mkdir -p "$A"/{lists/partial,cache,archives/partial} "$WORK/debs" "$WORK/x"
cat >"$A/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
EOF
APT_OPTS=(-oDir::State::Lists="$A/lists" -oDir::Etc::SourceList="$A/sources.list" -oDir::Etc::SourceParts=/dev/null
  -oDir::Cache="$A/cache" -oDir::Cache::archives="$A/archives" -oAPT::Sandbox::User=root -oDebug::NoLocking=1)
apt_update() { apt-get "${APT_OPTS[@]}" update -qq >>"$BUILD_LOG" 2>&1; }
step "apt-get update (private bookworm lists)" apt_update

fetch() {
  cd "$WORK/debs"
  # Go toolchain; rsync (+libpopt0) is needed by k8s' make; reflect2 1.0.2 / json-iterator 1.1.12 replace the vendored
  # reflect2 1.0.1, which crashes the apiserver (fault in aeshashbody / UnsafeMapType.UnsafeIterate) with Go >= 1.18.
  apt-get "${APT_OPTS[@]}" download -qq "$GO_PKG-go" "$GO_PKG-src" rsync libpopt0 \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev >>"$BUILD_LOG" 2>&1
  for d in *.deb; do dpkg-deb -x "$d" "$WORK/x"; done
  cd "$WORK"
  # bookworm: kubernetes 1.20.5+really1.20.2-1.1+deb12u1 (the "really" is Debian's: the code is 1.20.2)
  apt-get "${APT_OPTS[@]}" source --download-only kubernetes >>"$BUILD_LOG" 2>&1
  compgen -G "$WORK/kubernetes_*.orig.tar.gz" >/dev/null || die "kubernetes source not downloaded"
}
step "download Go, rsync, Go libs and the kubernetes $K8S_VERSION source (~110 MB)" fetch

GOROOT_DIR=$(echo "$WORK"/x/usr/lib/go-1.*)
[[ -x $GOROOT_DIR/bin/go ]] || die "no go binary under $WORK/x/usr/lib"
# rsync from the .deb needs libpopt.so.0, which is not installed by default: wrap it
mkdir -p "$WORK/bin"
cat >"$WORK/bin/rsync" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$WORK/x/lib/x86_64-linux-gnu:$WORK/x/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$WORK/x/usr/bin/rsync" "\$@"
EOF
chmod +x "$WORK/bin/rsync"
"$WORK/bin/rsync" --version >/dev/null || die "the unpacked rsync does not run"

SRC=$WORK/src
prepare() {
  cd "$WORK"
  mkdir -p "$SRC"
  tar xzf kubernetes_*.orig.tar.gz -C "$SRC" --strip-components=1
  [[ -f $SRC/cmd/kube-apiserver/apiserver.go ]] || die "unexpected source layout"
  tar xJf kubernetes_*.debian.tar.xz -C "$SRC"
  cd "$SRC"
  local p
  if [[ -f debian/patches/series ]]; then
    while read -r p _; do
      [[ -z $p || $p == \#* ]] && continue
      patch -p1 -s --no-backup-if-mismatch <"debian/patches/$p" || die "patch $p does not apply"
    done <debian/patches/series
  fi
  for p in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    [[ -d $WORK/x/usr/share/gocode/src/$p ]] || die "missing $p in the unpacked Debian Go libraries"
    rm -rf "vendor/$p"
    mkdir -p "vendor/$p"
    cp -r "$WORK/x/usr/share/gocode/src/$p/." "vendor/$p/"
    find "vendor/$p" -name '*_test.go' -delete
  done
  # GOPATH layout used by `make` (k8s 1.20 builds in GOPATH mode, like debian/rules)
  mkdir -p .go/src/k8s.io
  ln -sfn ../../.. .go/src/k8s.io/kubernetes
}
step "unpack source, apply Debian patches, swap vendored reflect2/json-iterator" prepare

build() {
  cd "$SRC"
  env PATH="$WORK/bin:$GOROOT_DIR/bin:$PATH" GOROOT="$GOROOT_DIR" GOPATH="$SRC/.go" GOCACHE="$WORK/gocache" \
    GOFLAGS= GOTOOLCHAIN=local GOPROXY=off CGO_ENABLED=0 HOME="$WORK/home" KUBE_BUILD_PLATFORMS=linux/amd64 \
    KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR="$(cut -d. -f2 <<<"$K8S_VERSION")" \
    KUBE_GIT_TREE_STATE=clean GOLDFLAGS="-s -w" \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >>"$BUILD_LOG" 2>&1 ||
    { tail -40 "$BUILD_LOG" >&2; die "make failed"; }
}
step "make kube-apiserver + kube-controller-manager with $("$GOROOT_DIR/bin/go" version | cut -d' ' -f3) (~4-5 min on 2 cores)" build

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
cp "$SRC/_output/bin/kube-apiserver" "$SRC/_output/bin/kube-controller-manager" "$OUT.tmp/"
V_KAS=$("$OUT.tmp/kube-apiserver" --version)
V_KCM=$("$OUT.tmp/kube-controller-manager" --version)
[[ $V_KAS == "Kubernetes v$K8S_VERSION" ]] || die "unexpected kube-apiserver version: $V_KAS"
{
  echo "$V_KAS"
  echo "kube-controller-manager: $V_KCM"
  dsc=$(echo "$WORK"/kubernetes_*.dsc)
  dsc=${dsc##*/kubernetes_}
  echo "source: Debian bookworm kubernetes ${dsc%.dsc}, vendor reflect2/json-iterator from Debian"
  echo "go: $("$GOROOT_DIR/bin/go" version)"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(_el "$T_START")"
} >"$OUT.tmp/VERSION"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "done in $(_el "$T_START"): $OUT ($(du -sh "$OUT" | cut -f1)) -- $V_KAS"
