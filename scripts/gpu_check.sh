#!/usr/bin/env bash
# The GPU check: everything hgf claims for a CUDA GPU, in one call of under ~10 minutes.
#
#   1. the Triton GEMV at 4096² and 8192²  GB/s of packed weights against the device's copy bandwidth
#   2. decode of the 1b preset            packed i2/tq1 vs dense bf16 (hgf bench infer), per arm
#   (1 and 2 run alone on the GPU; then, side by side until TOTAL_S:)
#   3. the GPU tests                      pytest -m gpu (Triton kernels vs the reference, bf16 training)
#   4. 200 steps of the paper preset      the hgf arm, to show the pipeline and its step time
#   5. the "why" study's runs (issue 15)  every run of the why_tokens, why_width and why_lr presets
#                                         (seeds, variants; a third seed of experiment 2's
#                                         bitnet/hgf/hgf_std/fp16_lr1e-3 and of experiment 4's
#                                         tokens-regime gates and hgf_std) not yet in results/
#                                         (done.json), one
#                                         process per run, WHY_P at once,
#                                         longest first; runs not finished by TOTAL_S keep their
#                                         curves so far (no done.json: reports skip them)
#   6. the conversion study (issue 16)    the `convert` preset (small FP model, then every arm x 2
#                                         seeds, one process per arm and seed at once; scratch beside
#                                         the FP model), in $WORK/convert_study, until TOTAL_S; with
#                                         part why, both side by side
#   (grid, optional: the paper grid, time-boxed, one seed per arm)
#
# Usage, from the repository root, with the data at the default path (../shared/data/tinystories)
# or online:   OUT=gpu_out bash scripts/gpu_check.sh
# Everything lands in $OUT (at most 8 files): gpu_check.log, gemv.json, decode_1b.json,
# why_runs.tgz (compact run records: config, metrics, run_info, done, logs; no weights) and
# oracle_model.tgz.* (the why_width bitnet seed-0 weights, split in < 16 MB parts, for the oracle
# probe on a CPU), convert_runs.tgz (the conversion study's records and report). Rebuild the
# reports from them with
#   tar xzf why_runs.tgz -C results/ && hgf reproduce --preset why_width --report-only
#   tar xzf convert_runs.tgz -C results/gpu/ && hgf reproduce --preset convert --report-only --out results/gpu
# A dry run on a CPU checks the plumbing in a few minutes:
#   OUT=/tmp/gc DEVICE=cpu DECODE_SIZE=debug GEMV_SIZES=512 CHECK_STEPS=3 WHY_SCALE=200 TOTAL_S=240 \
#     bash scripts/gpu_check.sh
# (PARTS="convert" WHY_SCALE=200 ...: the conversion study at 1/200 of its steps.)
set -uo pipefail
OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
DECODE_SIZE=${DECODE_SIZE:-1b}
GEMV_SIZES=${GEMV_SIZES:-4096 8192}
CHECK_STEPS=${CHECK_STEPS:-200}
GRID_S=${GRID_S:-400}  # at most; the grid ends by TOTAL_S after the start
TOTAL_S=${TOTAL_S:-545}  # everything ends by then (the why runs and the grid are cut there)
WHY_P=${WHY_P:-8}  # why runs at once (16 tiny runs time-sliced on one H200 ran slower in all)
WHY_SCALE=${WHY_SCALE:-1}  # divide every why run's steps by this (dry runs)
WHY_DTYPE=${WHY_DTYPE:-float32}  # why_tokens/why_width train in float32, as on the CPU (why_lr: bf16)
PRESET=${PRESET:-paper}  # the reproduce preset of parts check and grid
GRID=${GRID:-"2500:fp16,bitnet,diff_only,hgf,hgf_std,bitnet_diff 3500:fp16,bitnet,hgf"}
PARTS=${PARTS:-"gemv decode tests check why"}  # a subset reruns only those parts (+ convert)
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
  nproc --all; uptime  # --all: nproc alone honours OMP_NUM_THREADS
} >>"$LOG" 2>&1

want() { [[ " $PARTS " == *" $1 "* ]]; }

# shellcheck disable=SC2086  # GEMV_SIZES is a list
want gemv && step gemv 90 $PY -m hgf.kernels.bench --device "$DEVICE" --sizes $GEMV_SIZES --dtypes float32 bfloat16 \
  --json "$OUT/gemv.json"
if want decode; then  # one process per arm: a slow arm cannot take the others' numbers with it
  for arm in ${DECODE_ARMS:-bitnet-std hgf-diff}; do
    step decode-$arm 110 $PY -m hgf bench infer --device "$DEVICE" --size "$DECODE_SIZE" --gemv-sizes \
      --dense bfloat16 --arms $arm --packings i2 tq1 --tokens 64 --prompt-len 16 --rounds 3 \
      --json "$WORK/decode-$arm.json"
  done
  $PY - "$WORK" "$OUT/decode_$DECODE_SIZE.json" <<'PYEOF' >>"$LOG" 2>&1
import json, sys
from pathlib import Path
parts = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("decode-*.json"))]
if parts:
    out = {"env": parts[0]["env"], "decode": [], "decode_reference": []}
    for p in parts:
        out["decode"] += p["decode"]
        out["decode_reference"] += p["decode_reference"]
    Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
    print("decode records:", len(out["decode"]), "reference rows:", len(out["decode_reference"]))
PYEOF
fi

# From here on the GPU is shared: tests, the paper check and the why runs side by side.
bg=()
if want tests; then
  step gpu-tests 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py \
    tests/test_train_precision.py tests/test_methods_tequila_sherry.py &
  bg+=($!)
fi
if want check; then
  ( step paper-"$CHECK_STEPS"-steps 240 $PY -m hgf reproduce --preset "$PRESET" --arms hgf \
      --steps "$CHECK_STEPS" --seeds 1 --out "$WORK/check" --train.device="$DEVICE"
    tail -n 4 "$WORK/check/runs/"*/metrics.jsonl >>"$LOG" 2>&1 ) &
  bg+=($!)
fi

why_job() {  # why_job PRESET SELECTOR NAME STEPS SEED [OVERRIDES...]: one run, cut at DEADLINE
  local preset=$1 sel=$2 name=$3 steps=$4 seed=$5 left rc dir kind=runs
  shift 5
  [[ $sel == --variants ]] && kind=variants
  left=$((DEADLINE - $(date +%s)))
  [ "$left" -gt 30 ] || { echo "skipped (no time left)" >"$WHY/logs/$preset-$name-$steps-$seed.log"; return 0; }
  dir="$WHY/$preset/$kind/$name-${steps}steps-seed$seed"
  if [ -f "results/$preset/$kind/$name-${steps}steps-seed$seed/done.json" ]; then
    echo "done already in results/$preset/$kind" >"$WHY/logs/$preset-$name-$steps-$seed.log"
    return 0  # committed by an earlier session: only the missing runs run
  fi
  local cmd=($PY -m hgf reproduce --preset "$preset" "$sel" "$name" --steps "$steps" --seeds 2
             --seed-index "$seed" --out "$WHY/$preset" --train.device="$DEVICE" "$@")
  echo "${cmd[*]}" >"$WHY/logs/$preset-$name-$steps-$seed.log"
  timeout -s INT -k 20 "$left" "${cmd[@]}" >>"$WHY/logs/$preset-$name-$steps-$seed.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ ! -f "$dir/done.json" ] \
     && [ $((DEADLINE - $(date +%s))) -gt 60 ] && grep -q "\"compile\": true" "$dir/config.json" 2>/dev/null \
     && [[ " $* " != *compile=false* ]]; then
    # it failed, not cut at the deadline, with torch.compile on: keep its log, rerun it eagerly
    mv "$WHY/logs/$preset-$name-$steps-$seed.log" "$WHY/logs/$preset-$name-$steps-$seed.failed.log"
    rm -rf "$dir"
    why_job "$preset" "$sel" "$name" "$steps" "$seed" "$@" --train.compile=false
    return
  fi
  echo "$(date -u +%T) $preset $name $steps seed $seed: exit $rc" >>"$LOG"
}

why_part() {
  WHY="$WORK/why"
  mkdir -p "$WHY/logs"
  DEADLINE=$(( $(date +%s) + TOTAL_S - SECONDS ))
  s8=$((8000 / WHY_SCALE)); s25=$((2500 / WHY_SCALE)); s2=$((2000 / WHY_SCALE))
  f32="--train.dtype=$WHY_DTYPE"
  jobs=()  # longest first; seed 0 of a cell before its seed 1
  for seed in 0 1; do for arm in fp16 bitnet hgf_std; do
    jobs+=("why_tokens --arms $arm $s8 $seed $f32"); done; done
  for seed in 0 1; do for v in gate_channel gate_input; do  # experiment 4 in experiment 1's regime
    jobs+=("why_tokens --variants $v $s8 $seed $f32"); done; done
  for seed in 0 1; do for arm in bitnet fp16 hgf hgf_std bitnet_diff; do
    jobs+=("why_width --arms $arm $s25 $seed $f32"); done
    for v in gate_channel gate_input fp16_lr2e-3 fp16_lr1e-3 fp16_lr5e-4; do
      jobs+=("why_width --variants $v $s25 $seed $f32"); done; done
  # a third seed where experiment 2's differences are within 2 standard errors (hgf_std's
  # recovery against the cpu grid's, the gap itself)
  for arm in bitnet hgf hgf_std; do jobs+=("why_width --arms $arm $s25 2 $f32"); done
  jobs+=("why_width --variants fp16_lr1e-3 $s25 2 $f32")
  # and where experiment 4's (the gates in experiment 1's regime) are
  for v in gate_channel gate_input; do jobs+=("why_tokens --variants $v $s8 2 $f32"); done
  jobs+=("why_tokens --arms hgf_std $s8 2 $f32")
  for seed in 0 1; do for lr in 1p6e-2 8e-3 4e-3; do for arm in bitnet diff_only hgf hgf_std fp16; do
    jobs+=("why_lr --variants ${arm}_lr$lr $s25 $seed"); done; done; done
  for seed in 0 1; do for arm in fp16 bitnet hgf_std; do
    jobs+=("why_tokens --arms $arm $s2 $seed $f32"); done; done
  if [ -n "${WHY_ONLY:-}" ]; then  # a regular expression: only the matching runs
    mapfile -t jobs < <(printf '%s\n' "${jobs[@]}" | grep -E -- "$WHY_ONLY")
  fi
  echo "== $(date -u +%T) why: ${#jobs[@]} runs, $WHY_P at once, until $(date -u -d @"$DEADLINE" +%T)" | tee -a "$LOG"
  # the tokenized data once, before the processes that share its cache
  $PY -c "from hgf.reproduce.grid import load_preset, plan_grid; from hgf.data import prepare
from pathlib import Path; prepare(plan_grid(load_preset('why_lr'), Path('x'))[0].cfg, progress=False)" >>"$LOG" 2>&1
  export -f why_job
  export PY DEVICE WHY DEADLINE LOG
  printf '%s\n' "${jobs[@]}" | xargs -P "$WHY_P" -I{} bash -c 'why_job {}'
  ls "$WHY"/*/*/*/done.json 2>/dev/null | wc -l | xargs echo "== why runs finished:" | tee -a "$LOG"
  for f in "$WHY"/*/*/*/done.json; do echo "$f: $(tr -d '\n ' <"$f")"; done >>"$LOG" 2>&1
  tar czf "$OUT/why_runs.tgz" -C "$WHY" --exclude=checkpoints --exclude=model.safetensors \
    --exclude=tokenizer.json --exclude='*.png' .
  m="$WHY/why_width/runs/bitnet-${s25}steps-seed0"
  if [ -f "$m/done.json" ]; then  # the oracle probe's backbone, for a CPU run at home
    tar czf "$WORK/oracle_model.tgz" -C "$WHY" "why_width/runs/bitnet-${s25}steps-seed0/model.safetensors" \
      "why_width/runs/bitnet-${s25}steps-seed0/tokenizer.json"
    split -b 15m -d "$WORK/oracle_model.tgz" "$OUT/oracle_model.tgz."
  fi
}
convert_part() {
  CV="$WORK/convert_study"
  mkdir -p "$CV"
  left=$((TOTAL_S - SECONDS))
  # the preset as run here: CONVERT_DTYPE (float32 as on the CPU), the FP model eager unless
  # CONVERT_COMPILE=true (a failed compile would cost every arm), steps / WHY_SCALE (dry runs)
  mkdir -p "$WORK/preset"
  preset="$WORK/preset/convert.toml"  # the study's name is the file's: runs in $CV/convert
  $PY - "$WHY_SCALE" "$preset" "${CONVERT_DTYPE:-float32}" "${CONVERT_COMPILE:-false}" <<'PY'
import re, sys
k, dst, dtype, compile_ = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = open("configs/reproduce/convert.toml").read()
s = s.replace("[base.train]\n", f'[base.train]\ndtype = "{dtype}"\n', 1)
s = re.sub(r"^compile = true", f"compile = {compile_}", s, flags=re.M)
if k != 1:
    s = re.sub(r"^(fp_steps|ft_steps) = (\d+)", lambda m: f"{m[1]} = {max(int(m[2]) // k, 4)}", s,
               flags=re.M)
    s = re.sub(r"^max_valid_stories = .*", "max_valid_stories = 20", s, flags=re.M)
open(dst, "w").write(s)
PY
  cv() {  # cv LOGNAME ARMS [SEED]: one process of the study, stopped at the deadline
    local t=$((TOTAL_S - SECONDS))
    [ "$t" -gt 10 ] || { echo "-- convert $1: no time left" >>"$LOG"; return 0; }
    timeout -s INT -k 10 "$t" $PY -m hgf.reproduce.convert_study \
      --preset "$preset" --out "$CV" --arms "$2" ${3:+--seed-index "$3"} >"$CV/$1.log" 2>&1
    local rc=$?
    echo "-- $(date -u +%T) convert $1: exit $rc" >>"$LOG"
  }
  echo "== $(date -u +%T) convert study ($preset), until $((left / 60)) min from now" | tee -a "$LOG"
  ps=()
  for seed in 0 1; do cv "scratch-$seed" scratch "$seed" & ps+=($!); done
  cv fp ptq  # the FP model, then the no-training ternarization (it tokenizes for the arms)
  for arm in hgf_svd_ptq ptqtp; do cv "$arm" "$arm" & ps+=($!); done
  for seed in 0 1; do  # one process per (arm, seed); each ranked arm runs its two ranks in turn
    for arm in fp_ft hgf_svd_kd hgf_lora_kd qat qat_kd tequila_kd sherry_kd; do
      cv "$arm-$seed" "$arm" "$seed" &
      ps+=($!)
    done
  done
  for p in "${ps[@]}"; do wait "$p"; done
  $PY -m hgf.reproduce.convert_study --preset "$preset" --out "$CV" --report-only >>"$LOG" 2>&1
  tar czf "$OUT/convert_runs.tgz" -C "$CV" --exclude=checkpoints --exclude=model.safetensors \
    --exclude=tokenizer.json --exclude='*.png' .
  echo "== $(date -u +%T) convert study: $(ls "$CV"/*/*/done.json 2>/dev/null | wc -l) runs done" | tee -a "$LOG"
}
if want why && want convert; then  # side by side: the study's serial FP model leaves the GPU room
  why_part &
  bg+=($!)
  convert_part
elif want why; then
  why_part
elif want convert; then
  convert_part
fi
for p in "${bg[@]}"; do wait "$p"; done
want grid || { nvidia-smi >>"$LOG" 2>&1; echo "== $(date -u +%T) done; $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"; exit 0; }


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
