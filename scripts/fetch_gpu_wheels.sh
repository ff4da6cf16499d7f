#!/usr/bin/env bash
# Download, on a machine with PyPI access, the pure-Python wheels that an offline GPU machine may
# lack, into the git-ignored .whl/; copy .whl/ with the checkout and gpu_check.sh installs them:
#   scripts/fetch_gpu_wheels.sh
#   (on the GPU machine) bash scripts/gpu_check.sh
# The GPU image has torch (CUDA 13), nvcc, ninja, pytest, transformers, safetensors,
# huggingface-hub, numpy, Pillow, regex, requests, filelock and zipp; it lacks diffusers,
# importlib_metadata (a diffusers requirement) and tomesd (the comparison baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 tomesd==0.1.3 importlib_metadata==8.7.0
ls -la .whl
du -sh .whl
