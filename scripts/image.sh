#!/usr/bin/env bash
# The Hearth container image, without any registry: `make image` (idempotent, quiet when current).
#
#   scripts/image.sh            build localhost/hearth:<version> if its inputs changed
#   scripts/image.sh podman …   run podman with the project's configuration (.containers/)
#   scripts/image.sh env        print the CONTAINERS_* exports (eval "$(scripts/image.sh env)")
#   scripts/image.sh clean      remove the project's containers, images and podman storage
#                               (not the input cache in ~/.cache/hearth-image: base tarball, wheels)
#
# Podman's storage and configuration live in .containers/ (gitignored), never in the machine's
# defaults. Steps: (1) containers.conf / storage.conf, (2) the base image made with debootstrap
# from the mirror the host's apt uses, then `podman import`, (3) a wheelhouse of the runtime
# dependencies built on the host (pip inside a build has no CA bundle and needs no network this
# way), (4) the dependency image (Containerfile.deps: apt, venv, wheels) tagged with a hash of its
# inputs, loaded from the cache when another clone built it (a fresh clone, CI, would otherwise
# rebuild apt and pip layers each time), else built and saved there, (5) `podman build
# --pull=never` of Containerfile on it, labelled with a hash of every input: when the label of
# the existing image matches, nothing is done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
C=$ROOT/.containers
BASE=localhost/hearth-base:bookworm
# Inputs, not images: the debootstrapped base as a tarball and the wheelhouse are kept in the
# user's cache too, so another clone on this machine skips debootstrap and pip (as pip's cache).
CACHE=${HEARTH_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth-image}
say() { printf '[image] %s\n' "$*"; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }

version() { sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1; }
IMAGE=localhost/hearth:$(version)

write_if_changed() { # path, content: rewrite only when different (keeps mtimes stable)
  if [ ! -f "$1" ] || [ "$(cat "$1")" != "$2" ]; then printf '%s\n' "$2" >"$1"; fi
}

configure() {
  mkdir -p "$C/storage" "$C/run" "$C/tmp"
  # root here lacks CAP_SYS_RESOURCE: podman's default nofile (1048576) fails with
  # "error setting rlimit type 7"; use the shell's hard limits instead.
  local nofile nproc
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  # crun fails on hybrid cgroups ("cgroups in hybrid mode not supported"): runc. PID 1 is not
  # systemd: cgroupfs. File locks in our own tmp_dir: podman's shared-memory lock table is
  # machine-wide and a fresh store would reset it under other stores' containers.
  write_if_changed "$C/containers.conf" "# written by scripts/image.sh
[containers]
default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]
[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
events_logfile_path = \"$C/events.log\"
lock_type = \"file\"
tmp_dir = \"$C/tmp\""
  write_if_changed "$C/storage.conf" "# written by scripts/image.sh
[storage]
driver = \"overlay\"
graphroot = \"$C/storage\"
runroot = \"$C/run\""
  export CONTAINERS_CONF=$C/containers.conf CONTAINERS_STORAGE_CONF=$C/storage.conf
}

need_tools() {
  local t
  for t in podman buildah debootstrap runc; do
    command -v "$t" >/dev/null || die "$t is missing: run 'make install' (scripts/install.sh installs it)"
  done
  [ "$(id -u)" = 0 ] || die "building the image needs root (podman, debootstrap)"
}

apt_mirror() { # the Debian mirror the host's apt already uses
  local m=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" && $0 !~ /security/ {print ($2 ~ /^\[/ ? $3 : $2); exit}' /etc/apt/sources.list)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

build_base() {
  podman image exists "$BASE" && return 0
  local rootfs=$C/rootfs t0=$SECONDS tarball=$CACHE/base-bookworm.tar
  if [ -f "$tarball" ]; then
    podman import -q --change 'CMD ["/bin/bash"]' "$tarball" "$BASE" >/dev/null
    say "base image $BASE imported from $tarball"
    return 0
  fi
  say "making the base image $BASE with debootstrap (about 30 s, once)"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$(apt_mirror)" >"$C/debootstrap.log" 2>&1 ||
    { tail -n 20 "$C/debootstrap.log"; die "debootstrap failed (log: $C/debootstrap.log)"; }
  # the image gets the host's sources (updates and security too), and no caches
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
    rm -f "$rootfs/etc/apt/sources.list"
  fi
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  mkdir -p "$CACHE"
  tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  podman import -q --change 'CMD ["/bin/bash"]' "$tarball" "$BASE" >/dev/null
  rm -rf "$rootfs"
  say "base image ready ($((SECONDS - t0)) s)"
}

# Debian's python3 is the image's interpreter (same package, same full version): dependencies with
# markers such as `python_full_version < "3.11.3"` then resolve on the host as they will in the image.
HOST_PY=/usr/bin/python3

# the extras the built-in functions need (fedavg, vecsearch, replay) go into the image too
IMAGE_EXTRAS="fedavg vecsearch replay"

build_wheels() { # runtime dependencies of pyproject.toml (+ IMAGE_EXTRAS), as wheels, on the host
  local py=$HOST_PY deps stamp w=$C/wheels
  [ -x "$py" ] || die "the wheelhouse needs Debian's python3 on the host: run 'make install'"
  deps=$(IMAGE_EXTRAS=$IMAGE_EXTRAS "$py" -c 'import os, tomllib; IMAGE_EXTRAS = os.environ["IMAGE_EXTRAS"]; p = tomllib.load(open("pyproject.toml", "rb")); x = p["project"]["optional-dependencies"]; print("\n".join(dict.fromkeys(p["project"]["dependencies"] + [d for e in IMAGE_EXTRAS.split() for d in x[e]] + list(p["build-system"]["requires"]))))')
  stamp=$({ "$py" -VV; printf "%s\n" "$deps"; } | sha256sum | cut -c1-16)
  [ -f "$w/.stamp" ] && [ "$(cat "$w/.stamp")" = "$stamp" ] && return 0
  if [ -f "$CACHE/wheels-$stamp/.stamp" ]; then # another clone built this very wheelhouse
    rm -rf "$w" && cp -r "$CACHE/wheels-$stamp" "$w" && return 0
  fi
  say "building the wheelhouse of Hearth's dependencies on the host (once per dependency change)"
  "$py" -m pip --version >/dev/null 2>&1 || die "the wheelhouse needs python3-pip: run 'make install'"
  rm -rf "$w.new"; mkdir -p "$w.new"
  printf '%s\n' "$deps" >"$w.new/wanted.txt"
  "$py" -m pip wheel -q --disable-pip-version-check -w "$w.new" -r "$w.new/wanted.txt" \
    >"$C/wheels.log" 2>&1 || { tail -n 20 "$C/wheels.log"; die "pip wheel failed (log: $C/wheels.log)"; }
  # exact pins (name==version from each wheel's file name): the image's dependency layer is
  # rebuilt when, and only when, one of them changes
  (cd "$w.new" && ls ./*.whl | sed -E 's#^\./##; s/^([^-]+)-([^-]+)-.*/\1==\2/' |
    grep -v -E '^(setuptools|wheel)==' | sort) >"$w.new/requirements.txt"
  rm "$w.new/wanted.txt"
  echo "$stamp" >"$w.new/.stamp"
  rm -rf "$w"; mv "$w.new" "$w"
  mkdir -p "$CACHE"; rm -rf "$CACHE"/wheels-*  # keep one wheelhouse: the current one
  cp -r "$w" "$CACHE/wheels-$stamp.tmp" && mv "$CACHE/wheels-$stamp.tmp" "$CACHE/wheels-$stamp"
}

DEPS_REPO=localhost/hearth-deps
DEPS_IMAGE=""

deps_hash() { # what the dependency image is made of (the base's id is the same in every clone)
  {
    echo "base $(podman image inspect --format '{{.Id}}' "$BASE")"
    sha256sum Containerfile.deps .containers/wheels/requirements.txt  # relative: the same in every clone
  } | sha256sum | cut -c1-16
}

build_deps() { # localhost/hearth-deps:<hash>: present, else loaded from the cache, else built + saved
  local h t0=$SECONDS tarball
  h=$(deps_hash)
  DEPS_IMAGE=$DEPS_REPO:$h
  tarball=$CACHE/deps-$h.tar
  podman image exists "$DEPS_IMAGE" && return 0
  if [ -f "$tarball" ] && podman load -q -i "$tarball" >/dev/null 2>&1 &&
      podman image exists "$DEPS_IMAGE"; then
    say "dependency image $DEPS_IMAGE loaded from $tarball ($((SECONDS - t0)) s)"
    return 0
  fi
  say "building the dependency image $DEPS_IMAGE (apt and ~1 GB of wheels, once per dependency change; log: .containers/build-deps.log)"
  if ! podman build --pull=never --layers -f Containerfile.deps -t "$DEPS_IMAGE" . \
      >"$C/build-deps.log" 2>&1; then
    tail -n 30 "$C/build-deps.log"; die "podman build of the dependency image failed (log: $C/build-deps.log)"
  fi
  mkdir -p "$CACHE"
  rm -f "$CACHE"/deps-*.tar  # keep one: the current one
  podman save -q -o "$tarball.$$.tmp" "$DEPS_IMAGE" && mv "$tarball.$$.tmp" "$tarball"
  say "dependency image $DEPS_IMAGE built and saved to $tarball ($((SECONDS - t0)) s)"
}

inputs_hash() { # everything the build reads: the same set as .containerignore lets in
  {
    echo "deps $DEPS_IMAGE $(podman image inspect --format '{{.Id}}' "$DEPS_IMAGE")"
    sha256sum Containerfile .containerignore .containers/wheels/requirements.txt
    find pyproject.toml README.md platform controller proxies functions -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.so' ! -path '*.egg-info/*' -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-32
}

build_image() {
  local h have t0=$SECONDS
  h=$(inputs_hash)
  have=$(podman image inspect --format '{{index .Labels "dev.hearth.inputs"}}' "$IMAGE" 2>/dev/null || true)
  [ "$have" = "$h" ] && return 0
  say "building $IMAGE on $DEPS_IMAGE (log: .containers/build.log)"
  if ! podman build --pull=never --layers -f Containerfile -t "$IMAGE" \
      --build-arg "DEPS_IMAGE=$DEPS_IMAGE" --label "dev.hearth.inputs=$h" --label "org.opencontainers.image.version=$(version)" \
      --label "org.opencontainers.image.title=hearth" . >"$C/build.log" 2>&1; then
    tail -n 30 "$C/build.log"; die "podman build failed (log: $C/build.log)"
  fi
  podman image prune -f >/dev/null 2>&1 || true # the previous build's untagged layers
  # dependency images of earlier dependency lists
  podman images --format '{{.Repository}}:{{.Tag}}' | grep "^$DEPS_REPO:" | grep -vx "$DEPS_IMAGE" |
    xargs -r podman rmi >/dev/null 2>&1 || true
  say "built $IMAGE in $((SECONDS - t0)) s"
}

clean() {
  [ -d "$C" ] || return 0
  if [ -f "$C/containers.conf" ] && command -v podman >/dev/null; then
    export CONTAINERS_CONF=$C/containers.conf CONTAINERS_STORAGE_CONF=$C/storage.conf
    podman system reset -f >/dev/null 2>&1 || true
  fi
  rm -rf "$C"
}

case "${1:-build}" in
  build)
    need_tools
    configure
    exec 9>"$C/.lock"; flock 9 # one build at a time in this worktree
    build_base
    build_wheels
    build_deps
    build_image
    ;;
  podman) shift; configure; exec podman "$@" ;;
  env) configure; echo "export CONTAINERS_CONF=$C/containers.conf CONTAINERS_STORAGE_CONF=$C/storage.conf" ;;
  image-name) echo "$IMAGE" ;;
  clean) clean ;;
  *) die "usage: scripts/image.sh [build|podman ARGS…|env|image-name|clean]" ;;
esac
