#!/usr/bin/env bash
# GPU check of the CUDA kernels, in one run of under 8 minutes on an H200:
#   1. install the carried wheels if diffusers is missing (diffusers, importlib_metadata, tomesd),
#   2. build the CUDA extension (tomesd-ext kernels --build) from the package's sources,
#      tomesd_ext/kernels/cuda/ (the kernels report after the build prints the path),
#   3. CUDA-vs-torch parity tests (tests/kernels, TOMESD_EXT_KERNELS=cuda: no silent fallback),
#   4. the GPU bench: SD1.5 at 512/1024/2048 and SDXL at 1024, fp16, batch 2:
#      baseline (SDPA) vs tomesd vs ours (torch kernels, CUDA kernels, reuse="level", reuse k=2),
#      speed, peak memory, fidelity (sharpened variant) and the matching/merge/unmerge share.
# Results go to $OUT (default ./gpu_out): gpu_check.log, build.log, parity.log, bench_sd15.json,
# bench_sdxl.json.
#
# How to run it (see docs/kernels.md):
#   with internet, once:  scripts/fetch_gpu_wheels.sh   (downloads ~6 MB of wheels into .whl/)
#   on the GPU machine, with .whl/ copied along:  bash scripts/gpu_check.sh
# Each stage gets a share of the budget (GPU_CHECK_BUDGET seconds, default 450) so the whole
# script ends in time even when a stage hangs; the bench writes its JSON after every size.
# DTYPE=bf16 reruns the bench in bfloat16 (e.g. if random-weight SDXL overflows in fp16).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
DTYPE=${DTYPE:-fp16}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
stage() { echo; echo "=== [$(($(date +%s) - START)) s] $*"; }
status=0

stage "environment"
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "diffusers is missing and there is no .whl/: run scripts/fetch_gpu_wheels.sh with internet and copy .whl/ here"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT
nvidia-smi -L || true
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), '| diffusers', diffusers.__version__)"
nvcc --version | tail -1

stage "build the extension"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TOMESD_EXT_CACHE=${TOMESD_EXT_CACHE:-/tmp/tomesd_ext_cache}
export MAX_JOBS=${MAX_JOBS:-16}
timeout 240 "$PY" -m tomesd_ext.commands.kernels --build --verbose > "$OUT/build.log" 2>&1
rc=$?
tail -n 5 "$OUT/build.log"
if [ $rc -ne 0 ]; then
  echo "BUILD FAILED (rc $rc): see build.log"; grep -n -m 20 -E "error|FAILED" "$OUT/build.log"
  exit 1
fi
TOMESD_EXT_KERNELS=cuda "$PY" -m tomesd_ext.commands.kernels

stage "parity tests (CUDA vs torch)"
t=$(( $(left) - 260 )); [ $t -lt 60 ] && t=60
TOMESD_EXT_KERNELS=cuda timeout $t "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/kernels/test_cuda_parity.py tests/kernels/test_torch_ops.py tests/kernels/test_dispatch.py \
  > "$OUT/parity.log" 2>&1
rc=$?
tail -n 25 "$OUT/parity.log"
[ $rc -ne 0 ] && { echo "PARITY TESTS FAILED (rc $rc)"; status=1; }

METHODS=tomesd,tome-torch,tome-cuda,tome-level,tome-level-k2
stage "bench SD1.5 512/1024/2048, $DTYPE, batch 2"
t=$(( $(left) - 90 )); [ $t -lt 60 ] && t=60
timeout $t "$PY" -m tomesd_ext.cli bench --device cuda --dtype "$DTYPE" --model sd15 --resolution 512 1024 2048 \
  --batch 2 --methods $METHODS --ratios 0.5 --inputs photo --repeats 3 --warmup 1 --steps 2 --micro --json "$OUT/bench_sd15.json"
rc=$?; [ $rc -ne 0 ] && { echo "SD1.5 bench ended with rc $rc (124 = out of time; finished sizes are in the JSON)"; status=1; }

stage "bench SDXL 1024, $DTYPE, batch 2"
t=$(( $(left) - 5 )); [ $t -lt 30 ] && t=30
timeout $t "$PY" -m tomesd_ext.cli bench --device cuda --dtype "$DTYPE" --model sdxl --resolution 1024 \
  --batch 2 --methods $METHODS --ratios 0.5 --inputs photo --repeats 3 --warmup 1 --steps 2 --micro --json "$OUT/bench_sdxl.json"
rc=$?; [ $rc -ne 0 ] && { echo "SDXL bench ended with rc $rc"; status=1; }

stage "done (status $status); results in $OUT"
ls -la "$OUT"
exit $status
