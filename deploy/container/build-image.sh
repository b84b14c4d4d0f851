#!/usr/bin/env bash
# Builds the runtime image (deploy/container/Containerfile) with podman/buildah, from a staging
# context holding only what the image needs: the wheel built from this checkout and the generated
# KServe config.
#
# Usage: deploy/container/build-image.sh [--rootfs DIR]
#   --rootfs DIR   use a root filesystem (e.g. from `debootstrap --include=python3,python3-venv,
#                  openjdk-17-jre-headless,tini,ca-certificates bookworm DIR`) as the base, for
#                  machines that cannot pull images; otherwise BASE (default debian:bookworm-slim).
# Environment: IMAGE (default localhost/torchserve-xai:0.1.0), BASE, TORCH_SPEC, TORCH_INDEX,
#   PIP_FIND_LINKS (a local wheel directory, mounted into the build; set TORCH_INDEX= to use it),
#   PIP_CERT (a CA bundle file for pip during the build).
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${IMAGE:-localhost/torchserve-xai:0.1.0}
PY=${PY:-.venv/bin/python}
# What podman needs in VMs like this project's: runc (crun is missing or fails), cgroupfs (no
# systemd), and file and process limits the VM allows (runc cannot raise them).
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
rootfs=""
if [ "${1:-}" = "--rootfs" ]; then rootfs=$2; shift 2; fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/dist" "$context/deploy/container" "$context/deploy/kserve/model-repository"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$context/dist" .
cp deploy/container/Containerfile "$context/deploy/container/"
cp -r deploy/kserve/model-repository/config "$context/deploy/kserve/model-repository/"

base=${BASE:-docker.io/library/debian:bookworm-slim}
if [ -n "$rootfs" ]; then
  base=localhost/torchserve-xai-base:rootfs
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import - "$base" >/dev/null
fi
args=(--build-arg "BASE=$base")
[ -n "${TORCH_SPEC:-}" ] && args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
[ -n "${TORCH_INDEX+set}" ] && args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
# A machine behind a TLS-inspecting proxy: its CA bundle, for pip inside the build only.
if [ -n "${PIP_CERT:-}" ]; then
  args+=(--volume "$PIP_CERT:/build-ca.crt:ro" --build-arg PIP_CERT=/build-ca.crt)
fi
if [ -n "${PIP_FIND_LINKS:-}" ]; then
  args+=(--volume "$PIP_FIND_LINKS:/wheelhouse:ro" --build-arg PIP_FIND_LINKS=/wheelhouse)
fi
start=$(date +%s)
"${PODMAN[@]}" build --network host --ulimit nofile=4096:4096 --layers=false -f "$context/deploy/container/Containerfile" \
  "${args[@]}" -t "$IMAGE" "$context"
echo "built $IMAGE in $(( $(date +%s) - start )) s; size: $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes"
