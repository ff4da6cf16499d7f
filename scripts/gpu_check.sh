#!/usr/bin/env bash
# GPU check, in one run of under 8 minutes on an H100/H200:
#   environment  install the carried wheels if diffusers is missing (diffusers, importlib_metadata, tomesd)
#   build        build the CUDA extension (tomesd-ext kernels --build) from tomesd_ext/kernels/cuda/
#   parity       CUDA-vs-torch parity tests (tests/kernels, TOMESD_EXT_KERNELS=cuda: no silent fallback)
#   sd15         bench SD1.5 at 512/1024, fp16, batch 2 (CFG), 2 steps: baseline vs tomesd vs ours
#                (torch kernels, CUDA kernels, reuse="level", reuse k=2)
#   sdxl         the same on SDXL at 1024
#   flux         Flux.1-dev at real width, 4 blocks (flux-depth4), 1024², bf16, batch 1, 2 steps:
#                baseline vs ours (torch, CUDA kernels, reuse k=2/4), compile vs ToMe + compile
#   sd35         SD3.5-large at real width, 2 blocks (sd35-large-depth2), 1024², bf16, batch 2:
#                ours (torch, CUDA kernels, reuse k=2)
#   wan          Wan2.1-T2V-1.3B (full depth), 480x832, 17 frames, bf16, batch 2: ours (torch,
#                CUDA kernels, reuse k=2)
# Each bench records speed, peak memory and fidelity (sharpened variant) per method.
#
#   bash scripts/gpu_check.sh            the GPU run (docs/kernels.md)
#   bash scripts/gpu_check.sh --dry-run  every stage on the CPU at tiny sizes (tiny models, fp32, no
#                                        CUDA methods, every grid merged (--min-tokens 0), an nvcc
#                                        compile of the sources instead of the build, compile with the
#                                        eager backend): a few minutes on 2 cores;
#                                        exits non-zero if any stage fails (tests/kernels/test_gpu_check.py)
#
# Results go to $OUT (default ./gpu_out): gpu_check.log, build.log, parity.log, one bench_<stage>.json
# per bench stage (written after every size), stage_<stage>.json per stage (exit status, seconds,
# files) and stages.json (all of them). Each stage gets a share of the budget (GPU_CHECK_BUDGET
# seconds, default 460; dry run 1500): a stage may use what earlier stages left, never the shares of later ones,
# so the run ends in time even when a stage hangs. DTYPE=bf16 runs the UNet benches in bfloat16
# too (default fp16); the transformers always run in bf16.
# With internet, once: scripts/fetch_gpu_wheels.sh (downloads ~6 MB of wheels into .whl/), then
# copy .whl/ along to the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $arg (use --dry-run or nothing)"; exit 2 ;;
  esac
done
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-$([ $DRY = 1 ] && echo 1500 || echo 460)}
START=$(date +%s)
status=0
STAGES=()

# stage NAME SHARE LATER: announce a stage; T = seconds it may run (what is left of the budget
# minus LATER, the shares of the stages after it; at least SHARE/2)
stage() {
  CUR=$1; CUR_START=$(date +%s)
  T=$(( BUDGET - (CUR_START - START) - $3 ))
  [ $T -lt $(( $2 / 2 )) ] && T=$(( $2 / 2 ))
  echo; echo "=== [$((CUR_START - START)) s] $CUR (up to $T s)"
}
# done_stage RC [FILE...]: record the stage's result in stage_<name>.json
done_stage() {
  local rc=$1; shift
  local files=""
  for f in "$@"; do files="$files${files:+, }\"$f\""; done
  local ok=true; [ "$rc" -ne 0 ] && { ok=false; status=1; echo "STAGE $CUR FAILED (rc $rc; 124 = out of time)"; }
  printf '{"stage": "%s", "ok": %s, "rc": %d, "seconds": %d, "dry_run": %s, "files": [%s]}\n' \
    "$CUR" "$ok" "$rc" $(( $(date +%s) - CUR_START )) "$([ $DRY = 1 ] && echo true || echo false)" "$files" \
    > "$OUT/stage_$CUR.json"
  STAGES+=("$OUT/stage_$CUR.json")
}

if [ $DRY = 1 ]; then
  DEVICE=cpu; UDTYPE=fp32; TDTYPE=fp32; REPEATS="--repeats 0 --warmup 0 --min-tokens 0"; COMPILE="--compile-backend eager"
  KERNELS=torch; CUDA_METHOD=""; INPUT=noise
  SD15=(--model tiny --resolution 64); SDXL=(--model tiny-sdxl --resolution 64)
  FLUX=(--model tiny-flux --resolution 64); SD35=(--model tiny-sd3 --resolution 64)
  WAN=(--model tiny-wan --resolution 32x32 --frames 5)
else
  DEVICE=cuda; UDTYPE=${DTYPE:-fp16}; TDTYPE=bf16; REPEATS="--repeats 3 --warmup 1"; COMPILE=""
  KERNELS=cuda; CUDA_METHOD=",tome-cuda"; INPUT=photo
  SD15=(--model sd15 --resolution 512 1024); SDXL=(--model sdxl --resolution 1024)
  FLUX=(--model flux-depth4 --resolution 1024); SD35=(--model sd35-large-depth2 --resolution 1024)
  WAN=(--model wan-1.3b --resolution 480x832 --frames 17)
fi
# bench NAME ARGS...: one bench stage writing bench_NAME.json
bench() {
  local name=$1; shift
  timeout $T "$PY" -m tomesd_ext.cli bench --device $DEVICE --ratios 0.5 --steps 2 $REPEATS --no-progress \
    --json "$OUT/bench_$name.json" "$@"
  done_stage $? "bench_$name.json"
}

stage environment 20 440
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "diffusers is missing and there is no .whl/: run scripts/fetch_gpu_wheels.sh with internet and copy .whl/ here"
    done_stage 2; exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { done_stage 2; exit 2; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT
export TOMESD_EXT_CACHE=${TOMESD_EXT_CACHE:-/tmp/tomesd_ext_cache}
[ $DRY = 0 ] && { nvidia-smi -L || true; }
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', '| diffusers', diffusers.__version__)"
rc=$?
command -v nvcc >/dev/null && nvcc --version | tail -1
done_stage $rc
[ $rc -ne 0 ] && exit 1

stage build 150 290
if [ $DRY = 1 ]; then
  # the sources through nvcc alone (seconds), not the extension against torch's headers (minutes)
  NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  if [ -x "$NVCC" ]; then
    rc=0
    for src in tomesd_ext/kernels/cuda/*.cu; do
      timeout $T "$NVCC" -c -O1 -std=c++17 -arch=sm_80 "$src" -o "$OUT/$(basename "$src" .cu).o" >> "$OUT/build.log" 2>&1 || rc=1
    done
    rm -f "$OUT"/*.o
  else
    echo "no nvcc here: the dry run checks the kernels report only" | tee -a "$OUT/build.log"; rc=0
  fi
  "$PY" -m tomesd_ext.commands.kernels >> "$OUT/build.log" 2>&1 || rc=1
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-16}
  timeout $T "$PY" -m tomesd_ext.commands.kernels --build --verbose > "$OUT/build.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] && { TOMESD_EXT_KERNELS=cuda "$PY" -m tomesd_ext.commands.kernels || rc=1; }
fi
tail -n 5 "$OUT/build.log"
[ $rc -ne 0 ] && grep -n -m 20 -E "error|FAILED" "$OUT/build.log"
done_stage $rc build.log
if [ $rc -ne 0 ] && [ $DRY = 0 ]; then
  KERNELS=torch; CUDA_METHOD=""  # no extension: the benches still run, without the CUDA method
fi

stage parity 30 260
TOMESD_EXT_KERNELS=$KERNELS timeout $T "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/kernels/test_cuda_parity.py tests/kernels/test_torch_ops.py tests/kernels/test_dispatch.py \
  > "$OUT/parity.log" 2>&1
rc=$?
tail -n 8 "$OUT/parity.log"
done_stage $rc parity.log

UNET_METHODS=tomesd,tome-torch$CUDA_METHOD,tome-level,tome-level-k2
stage sd15 60 200
bench sd15 "${SD15[@]}" --dtype $UDTYPE --batch 2 --methods $UNET_METHODS --inputs $INPUT --micro
stage sdxl 35 165
bench sdxl "${SDXL[@]}" --dtype $UDTYPE --batch 2 --methods $UNET_METHODS --inputs $INPUT --micro
stage flux 80 85
bench flux "${FLUX[@]}" --dtype $TDTYPE --batch 1 --methods tome-torch$CUDA_METHOD,tome-k2,tome-k4,compile,tome+compile \
  --inputs $INPUT $COMPILE
stage sd35 40 45
bench sd35 "${SD35[@]}" --dtype $TDTYPE --batch 2 --methods tome-torch$CUDA_METHOD,tome-k2 --inputs $INPUT
stage wan 45 0
bench wan "${WAN[@]}" --dtype $TDTYPE --batch 2 --methods tome-torch$CUDA_METHOD,tome-k2

"$PY" - "$OUT/stages.json" "${STAGES[@]}" <<'PYEOF'
import json, sys
json.dump([json.load(open(p)) for p in sys.argv[2:]], open(sys.argv[1], "w"), indent=1)
PYEOF
echo; echo "=== [$(( $(date +%s) - START )) s] done (status $status); results in $OUT"
ls -la "$OUT"
exit $status
