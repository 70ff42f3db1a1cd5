#!/usr/bin/env bash
# Make the CI base image without a registry: debootstrap a Debian bookworm minbase with python3, python3-venv and
# ca-certificates, trim it like debian:*-slim, put the host's CA bundle in it, and `docker import` it.
# Docker Hub is not reachable from CI, so `python:3.11-slim` (the Dockerfile's default BASE) cannot be pulled;
# scripts/image/build.sh passes `--build-arg BASE=localhost/ms2mg-base:bookworm` instead. See docs/image.md.
#
# Cached: does nothing if the image already exists in the daemon (its data root is under $MS2MG_CACHE).
#
# Needs: root, a running daemon (scripts/image/dockerd.sh start), debootstrap (apt-get installed if missing).
# Env:
#   MS2MG_CACHE        cache root (default /var/cache/ms2mg), for the daemon's socket location only
#   MS2MG_BASE_IMAGE   image name (default localhost/ms2mg-base:bookworm)
#   MS2MG_DEBIAN_MIRROR  (default http://deb.debian.org/debian)
#   MS2MG_REBUILD=1    make it again even if it exists
#   MS2MG_NO_APT=1     do not apt-get install debootstrap when it is missing (fail instead)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE=${MS2MG_BASE_IMAGE:-localhost/ms2mg-base:bookworm}
MIRROR=${MS2MG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
HOST_CA=/etc/ssl/certs/ca-certificates.crt
NAME=make-base

source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"

eval "$("$HERE/dockerd.sh" env)"
"$HERE/dockerd.sh" status || die "dockerd is not running: scripts/image/dockerd.sh start"

if [[ -z ${MS2MG_REBUILD:-} ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "cached: $IMAGE ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
  exit 0
fi

[[ $(id -u) == 0 ]] || die "debootstrap needs root"
if ! command -v debootstrap >/dev/null; then
  [[ ${MS2MG_NO_APT:-} != 1 ]] || die "debootstrap not found and MS2MG_NO_APT=1"
  log "installing debootstrap (apt-get) ..."
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null; } ||
    die "apt-get install debootstrap failed"
fi
[[ -s $HOST_CA ]] || die "no host CA bundle at $HOST_CA"

# rootfs on a real disk (device nodes, no noexec); never under the build context
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/ms2mg-base.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/rootfs

t=$(_us)
log "debootstrap --variant=minbase $SUITE from $MIRROR ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
  { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap done in $(_el "$t")"

# What debian:bookworm-slim leaves out (dpkg path-exclude keeps it out of later apt installs too), plus apt state.
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$ROOT"/usr/share/{man,groff,info,lintian,linda,locale}/* \
  "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/lib/apt/lists/* \
  "$ROOT"/var/log/* "$ROOT"/debootstrap
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
  "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" >"$ROOT/etc/apt/sources.list"

# CI-only: the CI network intercepts TLS with its own CA, which only the host trust store has. Without it,
# `pip install` in the build fails with CERTIFICATE_VERIFY_FAILED. (Do not run update-ca-certificates in an
# image built on this base: it would regenerate the bundle without that CA.)
cp "$HOST_CA" "$ROOT/etc/ssl/certs/ca-certificates.crt"

chroot "$ROOT" python3 -c 'import ensurepip, ssl, sys, venv; print(sys.version.split()[0])' >"$WORK/pyver" ||
  die "python3 in the rootfs does not work"

t=$(_us)
tar --numeric-owner -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'LABEL org.opencontainers.image.title=ms2mg-base' \
  --change "LABEL org.opencontainers.image.description=\"CI-only base for the ms2mg images: Debian $SUITE minbase, python3 $(cat "$WORK/pyver"), python3-venv and the CI host's CA bundle\"" \
  --change 'CMD ["python3"]' \
  - "$IMAGE" >/dev/null
log "docker import done in $(_el "$t")"
log "made $IMAGE (python $(cat "$WORK/pyver"), $(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')) in $(_el "$T_START")"
