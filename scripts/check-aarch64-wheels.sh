#!/usr/bin/env bash
# Every dependency of the device install (`pip install petah`) must have a wheel for 64-bit ARM
# Linux (edge boards): pip resolves the base dependencies for manylinux2014_aarch64, binary only.
# Usage: scripts/check-aarch64-wheels.sh [PYTHON_VERSION]   (default 3.11; needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.11}"
deps=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
mapfile -t requirements <<< "$deps"
pip download --quiet --no-cache-dir --dest "$target" --only-binary :all: --python-version "$version" \
  --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform linux_aarch64 \
  --implementation cp "${requirements[@]}"
echo "aarch64 wheels for every device dependency (python $version):"
ls "$target" | sed 's/^/  /'
