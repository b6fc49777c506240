#!/usr/bin/env bash
# Build the agent image from Debian packages and this checkout, without any registry:
#   base   egress-top-base:<hash>  mmdebstrap of bookworm with the machine's apt sources
#   image  egress-top:<hash>       deploy/Dockerfile on top, with the project's wheels
# Both tags are content hashes, so a rerun with nothing changed builds nothing.
# Prints the image tag on the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_PACKAGES="python3,python3-venv,python3-bpfcc,libbpfcc,iproute2"
base_hash=$(printf 'bookworm minbase %s' "$BASE_PACKAGES" | sha256sum | cut -c1-12)
base="egress-top-base:$base_hash"
if ! docker image inspect "$base" >/dev/null 2>&1; then
  echo "build-image: making $base with mmdebstrap" >&2
  mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" bookworm - | docker import - "$base" >&2
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# (this machine's pip.conf lists local indexes; their "is ignored" warnings are noise)
.venv/bin/pip wheel --quiet --disable-pip-version-check --wheel-dir "$context/wheels" . 2>&1 \
  | grep -v "is ignored: it is neither" >&2 || true
ls "$context"/wheels/egress_top-*.whl >/dev/null || { echo "build-image: pip wheel failed" >&2; exit 1; }
cp deploy/Dockerfile "$context/"
# The wheel of this checkout carries a build timestamp in its archive: hash what went into it.
image_hash=$( (echo "$base"; cat deploy/Dockerfile pyproject.toml;
               find agent bpf schema -type f ! -path '*/__pycache__/*' | sort | xargs cat;
               ls "$context/wheels" | grep -v '^egress_top-') | sha256sum | cut -c1-12)
image="egress-top:$image_hash"
if ! docker image inspect "$image" >/dev/null 2>&1; then
  echo "build-image: building $image" >&2
  docker build --quiet --build-arg "BASE=$base" -t "$image" "$context" >&2
fi
echo "$image"
