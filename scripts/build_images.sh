#!/usr/bin/env bash
# Build the images from Dockerfile.cpu (and Dockerfile.gpu) for real, without a Docker daemon and
# without pulling a base image: buildah (overlay storage, chroot isolation) on a local Debian
# bookworm base made by debootstrap.
#
# The local base is Debian bookworm's own python3 (3.11.2), not Docker Hub's
# python:3.11.7-slim-bookworm that the Dockerfiles pin: base images can't be pulled here, and
# the 3.11.2/3.11.7 difference is acceptable for the local build (same minor version, same
# Debian release; the pinned requirement files install the same wheels on both).
#
# The inference and swarm images embed the default models: before building them, the project's
# offline builders stage them in .cache/image-models (python -m services.swarm.image_models,
# with the project's .venv: `make setup`).
#
# Everything is cached under .cache/images/ (gitignored): the debootstrap rootfs tarball (one
# base for every image) and buildah's storage. Re-running is cheap: the base is made once,
# buildah reuses layers. Images are tagged localhost/petals-chat-<target>:latest and :<chart
# appVersion> (what the chart's default image references resolve to).
# Disk: overlay storage keeps each layer once (STORAGE_DRIVER=vfs copies every layer in full:
# the CPU inference image alone took about 31 GB of vfs storage).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/build_images.sh [-h] [TARGET...]

Builds petals-chat-<TARGET> with buildah for each TARGET: ui, gateway, inference, swarm
(Dockerfile.cpu), inference-gpu, swarm-gpu (Dockerfile.gpu); default: ui gateway. On a
local Debian bookworm base made by debootstrap. Installs buildah and debootstrap (apt-get)
if missing. Prints each image's size at the end.

Environment:
  IMAGES_CACHE     cache directory (default: <repo>/.cache/images)
  STORAGE_DRIVER   buildah storage driver: overlay (default) or vfs
  PYTHON           python that stages the embedded models (default: <repo>/.venv/bin/python)
  DEBIAN_MIRROR    mirror for debootstrap (default: first bookworm mirror in apt's sources)
  TORCH_INDEX_URL  passed as a build arg when set (the inference/swarm torch index)
  TORCH_WHEELS     a host folder of wheels holding torch 2.13.0+cpu, mounted for the CPU
                   targets' RUN steps and given to pip as find-links (where PyTorch's CPU
                   index can't be reached); never used by the GPU targets (PyPI's CUDA torch)
  EXTRA_BUILD_ARGS more arguments for `buildah bud` (word-split)

Use the images with the same storage, e.g.:
  buildah --root .cache/images/storage-overlay --runroot .cache/images/run --storage-driver overlay images
  podman  --root .cache/images/storage-overlay --runroot .cache/images/run --storage-driver overlay images
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${IMAGES_CACHE:-$ROOT/.cache/images}"
BASE_IMAGE="localhost/petals-chat-base:bookworm"
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
    TARGETS=(ui gateway)
fi
for t in "${TARGETS[@]}"; do
    case "$t" in
        ui | gateway | inference | swarm | inference-gpu | swarm-gpu) ;;
        *)
            echo "unknown target: $t" >&2
            usage >&2
            exit 2
            ;;
    esac
done

log() { echo "[build_images] $*" >&2; }

# ---- tools -------------------------------------------------------------------------------
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    if [[ $EUID -ne 0 ]]; then
        echo "need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

mkdir -p "$CACHE"
DRIVER="${STORAGE_DRIVER:-overlay}"
BUILDAH=(buildah --root "$CACHE/storage-$DRIVER" --runroot "$CACHE/run" --storage-driver "$DRIVER")
APP_VERSION="$(awk -F'"' '/^appVersion:/ {print $2}' "$ROOT/charts/petals-chat/Chart.yaml")"

# ---- local base: debootstrap rootfs -> tarball -> FROM scratch image -------------------------
mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local m
    # deb822 sources (URIs: ...) and one-line sources (deb URL bookworm ...), first Debian one.
    m="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null \
        | awk '/^URIs:/ {print $2} /^deb / {print $2}' | grep -E '/debian/?$' | head -n1 || true)"
    echo "${m:-http://deb.debian.org/debian}"
}

ROOTFS_TAR="$CACHE/base/rootfs.tar"
if [[ ! -s "$ROOTFS_TAR" ]]; then
    MIRROR="$(mirror)"
    log "debootstrap bookworm from $MIRROR"
    rm -rf "$CACHE/rootfs.tmp"
    mkdir -p "$CACHE/base"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        bookworm "$CACHE/rootfs.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$CACHE/rootfs.tmp"/var/cache/apt/archives/*.deb "$CACHE/rootfs.tmp"/var/lib/apt/lists/*
    tar -C "$CACHE/rootfs.tmp" --numeric-owner -cf "$ROOTFS_TAR.tmp" .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$CACHE/rootfs.tmp"
    # a new rootfs makes a new base image
    "${BUILDAH[@]}" rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
fi

if ! "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    log "importing the base as $BASE_IMAGE"
    cat >"$CACHE/base/Containerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
CMD ["python3"]
EOF
    "${BUILDAH[@]}" bud --pull=never --isolation chroot -f "$CACHE/base/Containerfile" \
        -t "$BASE_IMAGE" "$CACHE/base" >&2
fi

# ---- pip inside the build: the host's CA bundle (PyPI may be reached through a TLS proxy) -------
# Mounted for RUN steps only, never part of an image: the bundle at /host-ca.crt and a pip.conf
# that points pip at it (Dockerfile.cpu declares no PIP_CERT arg, so a build arg would not reach
# pip; a mounted /etc/pip.conf does).
# TORCH_WHEELS is for the CPU targets only: its torch is the CPU wheel (2.13.0+cpu), which the
# GPU set's hash-pinned `torch==2.13.0` refuses. The GPU targets get no wheels folder and no torch index: PyPI's torch.
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"
printf '[global]\ncert = /host-ca.crt\n' >"$CACHE/pip.conf"
cp "$CACHE/pip.conf" "$CACHE/pip-gpu.conf"
MOUNTS=(-v "$HOST_CA:/host-ca.crt:ro" -v "$CACHE/pip.conf:/etc/pip.conf:ro")
GPU_MOUNTS=(-v "$HOST_CA:/host-ca.crt:ro" -v "$CACHE/pip-gpu.conf:/etc/pip.conf:ro")
if [[ -n "${TORCH_WHEELS:-}" ]]; then
    printf 'find-links = /host-wheels\n' >>"$CACHE/pip.conf"
    # torch comes from the wheels folder: an index that has nothing (no folder per project)
    # instead of PyTorch's CPU index, which pip would otherwise retry for minutes where it
    # can't be reached.
    TORCH_INDEX_URL="${TORCH_INDEX_URL:-file:///host-wheels}"
    MOUNTS+=(-v "$(cd "$TORCH_WHEELS" && pwd):/host-wheels:ro")
fi

# npm in the ui's build reads the same mounted bundle (Dockerfile.cpu's NODE_EXTRA_CA_CERTS).
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "NODE_EXTRA_CA_CERTS=/host-ca.crt")
gpu_build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi
# shellcheck disable=SC2206
extra=(${EXTRA_BUILD_ARGS:-})

cd "$ROOT"
for t in "${TARGETS[@]}"; do
    case "$t" in
        inference* | swarm*)
            log "staging the embedded models in .cache/image-models"
            "${PYTHON:-$ROOT/.venv/bin/python}" -m services.swarm.image_models >&2
            break
            ;;
    esac
done
for t in "${TARGETS[@]}"; do
    dockerfile=Dockerfile.cpu
    target="$t"
    mounts=("${MOUNTS[@]}")
    args=("${build_args[@]}")
    if [[ "$t" == *-gpu ]]; then
        dockerfile=Dockerfile.gpu
        target="${t%-gpu}"
        mounts=("${GPU_MOUNTS[@]}")
        args=("${gpu_build_args[@]}")
    fi
    log "building petals-chat-$t ($dockerfile, target $target)"
    start=$SECONDS
    "${BUILDAH[@]}" bud --pull=never --isolation chroot --layers \
        "${mounts[@]}" "${args[@]}" "${extra[@]}" \
        -f "$dockerfile" --target "$target" -t "petals-chat-$t" -t "petals-chat-$t:$APP_VERSION" . >&2
    log "built petals-chat-$t in $((SECONDS - start)) s"
done
"${BUILDAH[@]}" images >&2
for t in "${TARGETS[@]}"; do
    # bytes of the image's layers as stored (uncompressed), as `buildah images` rounds them
    log "size petals-chat-$t: $("${BUILDAH[@]}" images --format '{{.Size}}' "localhost/petals-chat-$t:latest" | head -n1)"
done
