#!/usr/bin/env bash
# Idempotent, quiet-when-done install of everything Hearth needs on Debian 12 (root):
# apt packages, kernel headers for bcc, bpffs, the venv with the package, and the helm binary.
# podman/buildah/debootstrap/runc/uidmap build and run the container image (scripts/image.sh);
# python3-pip lets Debian's python3 (the image's interpreter) build the image's wheelhouse.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
APT_PKGS="redis-server python3-bpfcc bpfcc-tools linux-headers-amd64 make podman buildah debootstrap runc uidmap python3-pip"
say() { printf '[install] %s\n' "$*"; }

missing=""
for p in $APT_PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then say "need root to apt-get install:$missing"; exit 1; fi
  say "apt-get install$missing"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
# The installed kernel-header package rarely matches the running kernel here: point
# /lib/modules/$(uname -r)/{build,source} at the newest installed -amd64 / -common headers.
K=$(uname -r)
if [ "$(id -u)" = 0 ] && [ ! -e "/lib/modules/$K/build/include" ]; then
  H=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
  C=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$H" ] && [ -n "$C" ]; then
    mkdir -p "/lib/modules/$K"; ln -sfn "$H" "/lib/modules/$K/build"; ln -sfn "$C" "/lib/modules/$K/source"
    say "linked kernel headers $(basename "$H") for $K"
  fi
fi
if [ "$(id -u)" = 0 ] && ! mountpoint -q /sys/fs/bpf 2>/dev/null; then mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true; fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then say "creating .venv"; "$PY" -m venv .venv; fi
STAMP=.venv/.hearth-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  say "pip install -e .[all,test,bench] (first time takes a minute)"
  LOG=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all,test,bench]"; } >"$LOG" 2>&1; then
    tail -n 40 "$LOG"; say "pip install failed (full log: $LOG)"; exit 1
  fi
  touch "$STAMP"
fi
# bcc is Debian's (python3-bpfcc): expose only that package to the venv.
SP=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$SP/bcc" ]; then ln -sfn /usr/lib/python3/dist-packages/bcc "$SP/bcc"; fi
bash scripts/fetch-tools.sh
