#!/usr/bin/env bash
# One prepared GPU check for a fresh H100/H200 machine (no network), headline numbers first, in about 8 minutes:
#   COMMIT=<sha> bash benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]     (STAGES=env,steps,... runs a subset)
# Carry the repo and WHEELS_DIR (`make gpu-wheels`: 15 wheels, 13.6 MB; wheels/ is ignored: name it in carry).
# .git does not travel: the commit is git's where there is one, else COMMIT=, else commit.txt in the repo root (the
# lead writes it before carrying); every result records it (env.git_commit reads USP_FAST_COMMIT).
#
# Stages, in order of value; each is skipped when its estimate does not fit what is left of BUDGET_S (480 s) and
# killed at its timeout (or what is left, if less); a step case is killed at its own timeout and the next one runs:
#   env          nvidia-smi, versions, the attention backends that import
#   install      offline_install.py install: the locked wheels, each named, --no-index --no-deps; usp-fast -e;
#                then every need of the set and of usp-fast checked against the real installed versions
#   tune         tune_launch.py at the DiT-XL/2 shapes (D=1152, bf16, B=32 and 256) -> launch_table.json, each
#                entry as measured; the step cases and the kernels suite then read it (USP_FAST_LAUNCH_TABLE)
#   steps        the headline step cases, one process per case, each case's rows published as soon as it ends
#   kernels      the kernels benchmark suite (speed and error vs eager at production shapes)
#   correctness  pytest tests/kernels (-m gpu production shapes included) on pytest-xdist workers
#   check        run.py --check of the results against benchmarks/targets.yaml (into summary.txt)
#   engine       DeepSpeed bf16 ZeRO-1 with accumulation and a stop/resume (losses within a stated tolerance),
#                a USP-initialised generate run with EMA, sampling (pixels autoencoder: no VAE weights)
#   compile      the torch.compile baselines of two step cases (a process each), if time is left; check again
#
# The 8-minute plan, from counted work (counted and timed on a CPU host, 2026-12-03):
#   Triton variants: 244 distinct ones launched by the CPU kernel tests (compile_gate.variant keys, counted under
#   TRITON_INTERPRET=1: adaLN fwd 46, bwd 46, finalize 43, move_rows 68, patch_norm_mse 41); 62 in the production
#   launches (compile_gate.production_cases); about 380 for the whole kernels test run on a GPU (issue 20's count).
#   Compile time per variant for sm_90a without a GPU (triton.compile + ptxas, compile_gate.compile_variant, cold
#   cache), two runs on a shared 2-core host: median 0.25 / 0.43 s, mean 0.29 / 0.45 s, max 0.67 / 1.25 s over the
#   production variants (Triton 3.8; the image has 3.6). Planned at 0.5 s/variant, serial within a process;
#   xdist workers compile in parallel.
#     env            5 s                                                              (timeout 30)
#     install       15 s  3 pip calls x ~4 s + 2 checks                              (timeout 90)
#     tune          35 s  2 ops x 2 batches = 4 groups x 2 directions x 21 configs; 42 distinct variants (counted:
#                         its launches captured at 132 SMs as compile_gate does) x 0.5 s = 21 s + timing
#                         4 x 42 x 23 calls x <1 ms = 4 s + start-up 8 s            (budget 45, timeout 60)
#     steps        180 s  5 cases, a process each: start-up 8 s + 2 bare implementations (usp-fast, reference) x
#                         (model build ~4 s + 16 steps) + the engine row (DeepSpeed init ~8 s + ~37 steps: timed
#                         with and without EMA, the EMA alone). DiT-XL/2 b256: 91 TFLOP/step at >=400 TFLOP/s =
#                         0.23 s/step -> 8 + 2 x 8 + 17 = 41 s; ViT-XL b256 31 s, DiT-XL/2 b32 27 s, ViT-L b256
#                         25 s; the first case of a kind also compiles its kernels (the compile gate's ~31 bf16
#                         production variants x 0.5 s: adaLN ~13 -> DiT b256 +6 s, masked tokens + loss ~10 -> ViT-XL
#                         +5 s, the affine LN ~8 -> USP-init +4 s): 47 + 36 + 27 + 25 + 45 = 180 s
#                         (each case killed at 3x its estimate)
#     kernels       55 s  62 variants x 0.5 s = 31 s + timings ~15 s + start-up 8 s   (timeout 90)
#     correctness   80 s  the production-shape file on one worker (--dist loadfile): ~140 variants x 0.5 s = 70 s;
#                         the rest, 244 x 0.5 s over 5 workers = 25 s; start-up 10 s  (timeout 120)
#     check          5 s
#     = 375 s of the 480 s budget for everything up to the check (105 s margin); the command limit is 600 s.
#     engine       100 s  4 runs x (start-up + DeepSpeed init ~12 s + 20-60 demo steps ~8 s) + sampling 10 s: runs
#                         when 100 s are left, i.e. when the stages above took <= 380 s (5 s over plan)
#     compile       90 s  a case: a cold torch.compile (~60-90 s) + its steps; each only when it fits
#
# OUT_DIR holds at most 8 files even after `kill -9` of this script at any point: 6 names (summary.txt, full.log,
# <device>.json, launch_table.json, kernels-junit.xml, correctness.json), plus at most two temporaries of an atomic
# write in flight (this script's .publish.tmp, tune's .launch_table.json.tmp<pid>). Everything else (run.py's
# charts and README, the engine's runs) lives in WORK (a folder under /tmp), copied into OUT when it is complete.
# The Hopper compile gate needs no GPU and runs in CI (benchmarks/compile_gate.py). NVIDIA DALI's GPU decode is
# not tested here (its wheel is too large to carry); the PIL decoder is.
# Not yet run on a GPU: written on a CPU-only machine; its CPU dry run (STAGES=env,steps,kernels,check with the
# tiny CPU cases) and the file count after a kill were run there (tests/benchmarks/test_gpu_check.py).
{  # the whole script is one compound command: bash reads it in full before running any of it
set -uo pipefail

OUT=${1:?usage: gpu_check.sh OUT_DIR [WHEELS_DIR]}
WHEELS=${2:-wheels}
BUDGET_S=${BUDGET_S:-480}
STAGES=${STAGES:-env,install,tune,steps,kernels,correctness,check,engine,compile}
PY=${PYTHON:-python}
RUN=${RUN:-"$PY benchmarks/run.py"}  # the benchmarks CLI (a test puts a fake here)
STEPS_ARGS=${STEPS_ARGS:-}           # extra run.py arguments for every step case
# the headline step cases, by value, each "name:estimate_s" (CASES= replaces them, e.g. the tiny CPU ones)
CASES=${CASES:-"generate/DiT-XL/2/b256:47 pretrain/usp_vit_xl/b256:36 generate/DiT-XL/2/b32:27 \
pretrain/usp_vit_l/b256:25 generate/DiT-XL/2/b256/usp-init:45"}
COMPILE_CASES=${COMPILE_CASES:-"generate/DiT-XL/2/b32:90 pretrain/usp_vit_l/b256:90"}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[[ -d $WHEELS ]] && WHEELS=$(cd "$WHEELS" && pwd)  # as given from the caller's folder
[[ -n ${WORK:-} ]] || { WORK=$(mktemp -d /tmp/gpu_check.XXXXXX); OWN_WORK=1; }
mkdir -p "$WORK/results"
LOG="$OUT/full.log"; SUMMARY="$OUT/summary.txt"
START=$(date +%s)
cd "$REPO"
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo "${COMMIT:-$(cat commit.txt 2>/dev/null)}")  # what env.git_commit records too
export USP_FAST_COMMIT=$COMMIT PYTHONUNBUFFERED=1
export USP_FAST_LAUNCH_TABLE="$OUT/launch_table.json"  # the tuned table, where tune wrote one (else the heuristic)
# where the install goes if the image's environment is read-only (offline_install.py --site): empty otherwise
SITE="$WORK/site"; mkdir -p "$SITE/bin"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
selected() { [[ ",$STAGES," == *",$1,"* ]]; }

# publish SRC NAME: copy a finished file into OUT under NAME, atomically (one temporary name, so at most one extra)
publish() {
  [[ -s $1 ]] || return 0
  cp "$1" "$OUT/.publish.tmp" && mv -f "$OUT/.publish.tmp" "$OUT/$2"
}

# publish_results: this device's results JSON, once it parses (a case killed while writing leaves OUT's copy as it
# was, and the next case starts from that copy again)
publish_results() {
  local f name
  for f in "$WORK"/results/*.json; do
    [[ -f $f ]] || continue
    name=$(basename "$f")
    if $PY -c "import json, sys; json.load(open(sys.argv[1]))" "$f" 2>/dev/null; then
      publish "$f" "$name"
    elif [[ -f $OUT/$name ]]; then
      cp "$OUT/$name" "$f"
    else
      rm -f "$f"  # half-written by the first case: the next one starts afresh rather than failing to read it
    fi
  done
}

# run_limited NAME LIMIT_S CMD...: CMD (a command or a stage function) with its output in full.log, killed at
# LIMIT_S (TERM, then KILL 5 s later); -> its exit status (124 or 137: the timeout)
run_limited() {
  local name=$1 limit=$2; shift 2
  (( limit > $(left) )) && limit=$(left)
  (( limit < 1 )) && limit=1
  echo "=== $name (timeout ${limit}s, $(left)s left, $(date -u +%T)) ===" >> "$LOG"
  if declare -F "$1" > /dev/null; then  # a stage function: timeout needs a process, so run it in a child bash
    timeout -k 5 "$limit" bash -c "$*" >> "$LOG" 2>&1
  else
    timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1
  fi
}

# stage NAME ESTIMATE_S TIMEOUT_S COMMAND...: runs COMMAND if selected and its estimate fits what is left
stage() {
  local name=$1 estimate=$2 limit=$3 rc t0; shift 3
  selected "$name" || return 0
  if (( $(left) < estimate )); then say "SKIP  $name (needs ~${estimate}s, $(left)s left)"; return 0; fi
  t0=$(date +%s)
  run_limited "$name" "$limit" "$@"; rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then say "ok    $name (${dt}s, estimate ${estimate}s)"
  elif (( rc == 124 || rc == 137 )); then say "TIME  $name (killed at ${dt}s, estimate ${estimate}s; see full.log)"
  else say "FAIL  $name (${dt}s, exit $rc; see full.log)"; fi
}

env_stage() {
  nvidia-smi || echo "nvidia-smi: not found (no GPU here)"
  echo "commit: ${USP_FAST_COMMIT:-unknown}"
  $PY - <<'EOF'
import importlib, platform, torch
cuda = torch.cuda.is_available()
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if cuda else "cpu",
      "capability", torch.cuda.get_device_capability(0) if cuda else None)
for mod in ("triton", "flash_attn_interface", "flash_attn", "apex", "deepspeed", "nvidia.dali", "xdist"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "installed"))
    except Exception as e:  # noqa: BLE001
        print(mod, "absent", type(e).__name__)
EOF
}

# step_cases LABEL "CASES" RUN-ARGS...: one process per case, each case's rows published as soon as it ends; a case
# that hangs is killed at 3x its estimate and the next one runs; a case that would not fit what is left is skipped
step_cases() {
  local label=$1 cases=$2 item name est rc t0 start; shift 2
  start=$(date +%s)
  say "      $label: $(echo $cases | wc -w) cases"
  for item in $cases; do
    name=${item%:*}; est=${item##*:}
    if (( $(left) < est )); then say "SKIP  $label $name (needs ~${est}s, $(left)s left)"; continue; fi
    t0=$(date +%s)
    # shellcheck disable=SC2086  # RUN and STEPS_ARGS are word lists
    run_limited "$label $name" $(( 3 * est )) $RUN --suite steps --out "$WORK/results" --repeats 10 \
      --cases "^${name}\$" "$@" $STEPS_ARGS; rc=$?
    publish_results
    say "      $label $name: exit $rc in $(( $(date +%s) - t0 ))s (estimate ${est}s)"
  done
  say "done  $label ($(( $(date +%s) - start ))s)"
}

check_stage() {
  # shellcheck disable=SC2086
  $RUN --check --out "$WORK/results" > "$WORK/check.txt" 2>&1; local rc=$?
  cat "$WORK/check.txt"; sed 's/^/      check: /' "$WORK/check.txt" >> "$SUMMARY"
  return $rc
}

engine_stage() {
  local runs="$WORK/runs"
  local common="run.out_dir=$runs data.root=$runs/images data.demo_images=0 train.precision=${PRECISION:-bf16}"
  export CUBLAS_WORKSPACE_CONFIG=:4096:8  # one cuBLAS workspace size: its algorithm choice cannot vary by run
  $PY - "$runs/images" <<'EOF' || return 1
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)  # smooth random colour fields: 4 classes x 16 images
for c in range(4):
    d = Path(sys.argv[1]) / "train" / f"c{c}"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(16):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((160, 144), Image.BICUBIC).save(d / f"{i}.JPEG", quality=90)
EOF
  # accumulation (global 32 = 2 x 16) under bf16 ZeRO-1, stopped and resumed: the losses must match a straight run
  usp-fast train --stage pretrain --config configs/pretrain/demo.yaml $common run.name=straight \
    train.max_steps=40 train.micro_batch=16 train.log_every=10 || return 1
  usp-fast train --stage pretrain --config configs/pretrain/demo.yaml $common run.name=resumed \
    train.max_steps=40 train.micro_batch=16 train.log_every=10 train.ckpt_every=20 train.run_steps=20 || return 1
  usp-fast train --stage pretrain --config configs/pretrain/demo.yaml --resume auto $common run.name=resumed \
    train.max_steps=40 train.micro_batch=16 train.log_every=10 train.ckpt_every=20 || return 1
  $PY - "$runs" <<'EOF' || return 1
# A stated tolerance, not ==: a GPU run does not repeat its bits (flash attention's backward adds dQ with atomics;
# cuBLAS may pick another split), so a correct resume differs from the straight run by run-to-run noise. That
# noise is measured here: the windows before the stop (steps <= 20) are the same computation in both runs. Bound
# on every window after it: relative max(2^-7, 4 x that noise), 2^-7 being two bf16 ulps. What it is for: a resume
# that loses the optimizer state, the lr step or the data position; in these first 40 steps the window loss still
# falls by more than the bound per window (not measured on a GPU yet: the log prints the figures). Steps must match.
import json, sys
from pathlib import Path
STOP = 20
rows = lambda name: [(r["step"], r["loss"]) for r in map(json.loads, (Path(sys.argv[1]) / name / "metrics.jsonl").open())]
a, b = rows("straight"), rows("resumed")
print("straight", a, "\nresumed ", b)
if [s for s, _ in a] != [s for s, _ in b]:
    sys.exit("resume: logged steps differ from the straight run")
rel = [(s, abs(x - y) / max(abs(x), abs(y), 1e-12)) for (s, x), (_, y) in zip(a, b)]
noise = max([d for s, d in rel if s <= STOP], default=0.0)
bound = max(2 ** -7, 4 * noise)
worst = max([d for s, d in rel if s > STOP], default=0.0)
falls = [abs(x1 - x0) / abs(x0) for (_, x0), (_, x1) in zip(a, a[1:])]
print(f"resume: after the stop the largest relative loss difference is {worst:.2e} (bound {bound:.2e}; noise before "
      f"the stop {noise:.2e}); the straight run's loss moves by {min(falls, default=0):.2e}..{max(falls, default=0):.2e} a window")
sys.exit(0 if worst <= bound else f"resume: losses differ by {worst:.2e} relative after the stop (> {bound:.2e})")
EOF
  # a USP-initialised generate run (bf16, EMA) and sampling from it
  usp-fast train --stage generate --config configs/generate/demo.yaml $common \
    generate.init=usp:$runs/straight/export train.max_steps=60 || return 1
  usp-fast sample --config configs/generate/demo.yaml run.out_dir="$runs" sample.num_images=16 \
    sample.classes=[0,1,2,3] sample.out_dir="$runs/samples" || return 1  # the demo config's classes are digits 0-9
  $PY -c "import numpy as np, sys; a = np.load('$runs/samples/samples.npz')['arr_0']; print('samples', a.shape, a.std()); sys.exit(0 if a.std() > 1 else 'blank samples')"
}

export OUT WORK WHEELS REPO PY RUN SUMMARY LOG
export -f env_stage engine_stage
stage env 5 30 env_stage
stage install 15 90 $PY benchmarks/offline_install.py install "$WHEELS" --site "$SITE"
stage tune 35 60 $PY benchmarks/tune_launch.py --out "$OUT/launch_table.json" --batches 32,256 --widths 1152 \
  --dtypes bf16 --ops ln_modulate,gate_residual_ln_modulate --budget-s 45
selected steps && step_cases steps "$CASES" --no-compile
# shellcheck disable=SC2086
stage kernels 55 90 $RUN --suite kernels --out "$WORK/results"
publish_results
# pytest-xdist workers compile in parallel (a file per worker: the production file writes correctness.json whole);
# the committed launch table, not the tuned one: these test what is committed
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-6} --dist loadfile")
# shellcheck disable=SC2086
stage correctness 80 120 env USP_FAST_TEST_GPU=1 USP_FAST_CORRECTNESS_JSON="$WORK/correctness.json" \
  USP_FAST_LAUNCH_TABLE= $PY -m pytest -q $XDIST tests/kernels --junitxml="$WORK/kernels-junit.xml"
publish "$WORK/kernels-junit.xml" kernels-junit.xml
publish "$WORK/correctness.json" correctness.json
export -f check_stage
stage check 5 30 check_stage
stage engine 100 150 engine_stage
# the torch.compile baselines (cold compiles, ~60-90 s each); the case's other rows are measured again beside them
selected compile && step_cases compile "$COMPILE_CASES"
if selected compile && (( $(left) >= 5 )); then stage check 5 30 check_stage; fi
say "total $(( $(date +%s) - START ))s of ${BUDGET_S}s; commit ${COMMIT:-unknown}; files: $(ls "$OUT" | tr '\n' ' ')"
[[ -n ${OWN_WORK:-} ]] && rm -rf "$WORK"
exit 0
}
