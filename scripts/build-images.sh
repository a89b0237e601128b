#!/usr/bin/env bash
# Build the GPRL images with buildah on a Debian base made from Debian's packages (no container registry needed).
#
#   scripts/build-images.sh [operator] [trainer]     (default: both; `make images`)
#
# 1. base: `mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm` -> a rootfs tar,
#    cached as ${GPRL_CACHE:-~/.cache/gprl}/images/debian-bookworm-python3.tar, imported as localhost/gprl-base:bookworm
#    (FROM scratch + ADD). Registries with a python:… image work too: set GPRL_PYTHON_IMAGE and skip this step.
# 2. each image: `buildah bud --isolation chroot` of images/<name>/Dockerfile with PYTHON_IMAGE=<the base>.
# Tags: localhost/gprl/<name>:<version of pyproject.toml>. Needs root (apt-get, chroot) — or a rootless buildah setup.
# Knobs: GPRL_BUILDAH_DRIVER (storage driver, default vfs: works in any container, copies each layer in full),
#        GPRL_PYTHON_IMAGE, GPRL_TRAINER_EXTRAS (pip extras of the trainer image, default "vllm,deepspeed").
# A constraints file at the repository root (constraints.txt) pins what pip installs inside the images.
# Timings go to stderr as `TIME <step> <ms>`, sizes as `SIZE <image> <bytes>`.
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${GPRL_CACHE:-$HOME/.cache/gprl}/images
driver=${GPRL_BUILDAH_DRIVER:-vfs}
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$here/pyproject.toml" | head -1)
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(operator trainer)
buildah=(buildah --storage-driver "$driver")
log() { echo "build-images: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
timed() { local name=$1 t0; shift; t0=$(date +%s%N); "$@"; echo "TIME $name $(( ($(date +%s%N) - t0) / 1000000 ))ms" >&2; }

need() {  # Debian packages providing the tools
  local missing=()
  for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: apt-get install buildah mmdebstrap (as root)"
  log "apt-get install ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

base_image() {
  if [ -n "${GPRL_PYTHON_IMAGE:-}" ]; then echo "$GPRL_PYTHON_IMAGE"; return; fi
  local tar=$cache/debian-bookworm-python3.tar ref=localhost/gprl-base:bookworm
  mkdir -p "$cache"
  if [ ! -s "$tar" ]; then
    need mmdebstrap
    log "mmdebstrap bookworm -> $tar"
    timed base-mmdebstrap mmdebstrap --quiet --format=tar --variant=minbase \
      --include=python3,python3-venv,ca-certificates bookworm "$tar.partial" >&2
    mv "$tar.partial" "$tar"
  fi
  if ! "${buildah[@]}" inspect --type image "$ref" >/dev/null 2>&1 \
      || [ "$("${buildah[@]}" inspect --type image --format '{{index .ImageAnnotations "gprl.base.tar"}}' "$ref")" \
           != "$(stat -c %Y "$tar")" ]; then
    local ctx; ctx=$(mktemp -d)
    ln "$tar" "$ctx/base.tar" 2>/dev/null || cp "$tar" "$ctx/base.tar"
    printf 'FROM scratch\nADD base.tar /\nCMD ["python3"]\n' > "$ctx/Containerfile"
    timed base-import "${buildah[@]}" bud --quiet --isolation chroot --annotation "gprl.base.tar=$(stat -c %Y "$tar")" \
      -t "$ref" -f "$ctx/Containerfile" "$ctx" >&2
    rm -rf "$ctx"
  fi
  echo "$ref"
}

build() {
  local name=$1 base=$2 args=()
  # A TLS-inspecting proxy's CA and the host's pip settings are visible to the RUN steps (never copied into the image)
  [ -f /etc/ssl/certs/ca-certificates.crt ] && args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  [ -f /etc/pip.conf ] && args+=(-v /etc/pip.conf:/etc/pip.conf:ro)
  [ "$name" = trainer ] && [ -n "${GPRL_TRAINER_EXTRAS+x}" ] && args+=(--build-arg "EXTRAS=$GPRL_TRAINER_EXTRAS")
  case $base in localhost/*) args+=(--pull=never) ;; esac  # made here: never look for it in a registry
  log "buildah bud images/$name (base $base)"
  timed "build-$name" "${buildah[@]}" bud --isolation chroot --layers=false --build-arg "PYTHON_IMAGE=$base" \
    "${args[@]}" -t "localhost/gprl/$name:$version" -f "$here/images/$name/Dockerfile" "$here" >&2
  echo "SIZE localhost/gprl/$name:$version $("${buildah[@]}" images --format '{{.Size}}' "localhost/gprl/$name:$version")" >&2
  echo "localhost/gprl/$name:$version"
}

need buildah
base=$(base_image)
for t in "${targets[@]}"; do
  case $t in
    operator|trainer) build "$t" "$base" ;;
    *) die "unknown image '$t' (operator, trainer)" ;;
  esac
done
