#!/usr/bin/env bash
# The GPU check: everything hgf claims for a CUDA GPU, in one call of under ~9 minutes.
#
#   1. the GPU tests                      pytest -m gpu (Triton kernels vs the reference, bf16 training)
#   2. the Triton GEMV at 4096² and 8192²  GB/s of packed weights against the device's copy bandwidth
#   3. decode of the 1b preset            packed i2/tq1 vs dense bf16 (hgf bench infer)
#   4. 200 steps of the paper preset      the hgf arm, to show the pipeline and its step time
#   5. the paper grid, time-boxed         every arm of `hgf reproduce --preset paper`, one seed,
#                                         run side by side on the one GPU for GRID_S seconds; runs
#                                         that do not finish keep their validation curve so far
#
# Usage, from the repository root, with the data at the default path (../shared/data/tinystories)
# or online:   OUT=gpu_out bash scripts/gpu_check.sh
# Everything lands in $OUT (at most 8 files): gpu_check.log, gemv.json, decode_1b.json and
# paper_runs.tgz (the compact run records: config, metrics, run_info, done; no weights). Rebuild the
# paper report from them with
#   tar xzf paper_runs.tgz -C results/ && hgf reproduce --preset paper --out results/paper --report-only
# A dry run on a CPU checks the plumbing in a minute:
#   OUT=/tmp/gc DEVICE=cpu DECODE_SIZE=debug GEMV_SIZES=512 CHECK_STEPS=3 GRID_S=20 bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
DECODE_SIZE=${DECODE_SIZE:-1b}
GEMV_SIZES=${GEMV_SIZES:-4096 8192}
CHECK_STEPS=${CHECK_STEPS:-200}
GRID_S=${GRID_S:-400}  # at most; the grid ends by TOTAL_S after the start
TOTAL_S=${TOTAL_S:-530}
PRESET=${PRESET:-paper}  # the reproduce preset of parts check and grid
GRID=${GRID:-"2500:fp16,bitnet,diff_only,hgf,hgf_std,bitnet_diff 3500:fp16,bitnet,hgf"}
PARTS=${PARTS:-"tests gemv decode check grid"}  # a subset reruns only those parts
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"

step() {  # step NAME LIMIT_S CMD...: run (stopped after LIMIT_S), log the command, status, wall time
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $(date -u +%T) $name: $*" | tee -a "$LOG"
  timeout -s INT -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  return $rc
}

{
  echo "# hgf GPU check, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
    'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  nproc; uptime
} >>"$LOG" 2>&1

want() { [[ " $PARTS " == *" $1 "* ]]; }

want tests && step gpu-tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/
# shellcheck disable=SC2086  # GEMV_SIZES is a list
want gemv && step gemv 90 $PY -m hgf.kernels.bench --device "$DEVICE" --sizes $GEMV_SIZES --dtypes float32 bfloat16 \
  --json "$OUT/gemv.json"
want decode && step decode 200 $PY -m hgf bench infer --device "$DEVICE" --size "$DECODE_SIZE" --gemv-sizes \
  --dense bfloat16 --packings i2 tq1 --tokens 64 --prompt-len 16 --rounds 3 \
  --json "$OUT/decode_$DECODE_SIZE.json"
if want check; then
  step paper-"$CHECK_STEPS"-steps 150 $PY -m hgf reproduce --preset "$PRESET" --arms hgf --steps "$CHECK_STEPS" \
    --seeds 1 --out "$WORK/check"
  tail -n 4 "$WORK/check/runs/"*/metrics.jsonl >>"$LOG" 2>&1
fi
want grid || exit 0

# The grid: one process per (regime, arm), all at once on the one GPU, stopped after GRID_S s.
left=$((TOTAL_S - SECONDS))
[ "$left" -lt "$GRID_S" ] && GRID_S=$left
[ "$GRID_S" -gt 30 ] || { echo "== no time left for the grid" | tee -a "$LOG"; exit 0; }
echo "== $(date -u +%T) paper grid, ${GRID_S} s: $GRID" | tee -a "$LOG"
pids=()
for cell in $GRID; do
  IFS=, read -r -a arms <<<"${cell#*:}"
  for arm in "${arms[@]}"; do
    OMP_NUM_THREADS=2 timeout -s INT "$GRID_S" $PY -m hgf reproduce --preset "$PRESET" --arms "$arm" \
      --steps "${cell%%:*}" --seeds 1 --out "$WORK/$PRESET" >"$WORK/grid-$arm-${cell%%:*}.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
for f in "$WORK"/grid-*.log; do echo "-- $f"; tail -n 3 "$f"; done >>"$LOG" 2>&1
nvidia-smi >>"$LOG" 2>&1
if [ -d "$WORK/$PRESET/runs" ]; then
  tar czf "$OUT/${PRESET}_runs.tgz" -C "$WORK" --exclude=checkpoints --exclude=model.safetensors \
    --exclude=tokenizer.json "$PRESET/runs"
fi
echo "== $(date -u +%T) done; $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
