#!/usr/bin/env bash
# One prepared GPU check for a fresh H100/H200 machine, in at most ~8 minutes:
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]        (STAGES=env,kernels,... reruns a subset)
# Stages (each timed, skipped when its estimate does not fit what is left of BUDGET_S, default 480 s):
#   env        nvidia-smi, versions, the attention backends that import (flash-attn 3 / 2, SDPA)
#   install    pip install --no-index the wheels folder (`make gpu-wheels`), then usp-fast itself --no-deps
#   kernels    the kernel tests compiled for the GPU (bf16 included), with the production-shape correctness tests
#              (`-m gpu`: every op against fp64, outputs poisoned, strided inputs, every gradient, bitwise-repeatable
#              backward) -> kernels-junit.xml, correctness.json
#   suite      the kernels benchmark suite (outputs and gradients vs eager at production shapes, speed-ups)
#   steps      key step cases: pretrain ViT-XL b128/b256, DiT-XL/2 b32/b256, and USP-initialised (LN affine,
#              exact GELU) DiT-XL/2 b32/b256 (usp-fast vs reference)
#   engine     DeepSpeed bf16 ZeRO-1 with accumulation and a resume that must give the same losses, a
#              USP-initialised generate run with EMA, sampling (pixels autoencoder: no VAE weights needed)
#   compile    torch.compile baselines of the steps cases, if time is left
#   check      benchmarks/run.py --check of the results file against targets.yaml
#   tune       benchmarks/tune_launch.py at D=1152 -> launch_table.json (commit it as kernels/launch_table.json
#              after rerunning the kernel tests with it), if time is left
# Writes at most 8 flat files into OUT_DIR: summary.txt (with each stage's seconds), full.log, kernels-junit.xml,
# correctness.json, <device>.json (commit it to benchmarks/results/), engine.log, check.txt, launch_table.json. The Hopper compile gate needs no GPU and runs in CI
# (benchmarks/compile_gate.py, benchmarks/results/compile-sm90.json).
# NVIDIA DALI's `mixed` GPU decode is NOT tested here (its wheel is too large to carry); the PIL decoder is.
# Not yet run on a GPU: written on a CPU-only machine (its env, compile-gate and check stages were run there).
set -uo pipefail

OUT=${1:?usage: gpu_check.sh OUT_DIR [WHEELS_DIR]}
WHEELS=${2:-wheels}
BUDGET_S=${BUDGET_S:-480}
STAGES=${STAGES:-env,install,kernels,suite,steps,engine,compile,check,tune}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
LOG="$OUT/full.log"; SUMMARY="$OUT/summary.txt"
START=$(date +%s)
cd "$REPO"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# stage NAME ESTIMATE_S COMMAND...: runs COMMAND (output to full.log) if it is selected and fits the budget
stage() {
  local name=$1 estimate=$2; shift 2
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  if (( $(left) < estimate )); then
    say "SKIP  $name (needs ~${estimate}s, $(left)s left)"; return 0
  fi
  local t0=$(date +%s) rc
  echo "=== $name ===" >> "$LOG"
  if declare -F "$1" > /dev/null; then  # a stage function: timeout needs a process, so run it in a child bash
    timeout "$(left)" bash -c "$*" >> "$LOG" 2>&1; rc=$?
  else
    timeout "$(left)" "$@" >> "$LOG" 2>&1; rc=$?
  fi
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then say "ok    $name (${dt}s)"; else say "FAIL  $name (${dt}s, exit $rc; see full.log)"; fi
}

env_stage() {
  nvidia-smi || return 1
  python - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for mod in ("triton", "flash_attn_interface", "flash_attn", "apex", "deepspeed", "nvidia.dali"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "installed"))
    except Exception as e:  # noqa: BLE001
        print(mod, "absent", type(e).__name__)
EOF
}

install_stage() {
  if [[ -d "$WHEELS" ]]; then python -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl || return 1; fi
  python -m pip install -q --no-deps --no-build-isolation -e .
}

engine_stage() {
  local runs="$OUT/.runs"  # not one of the 8 files: removed at the end
  local common="run.out_dir=$runs data.root=$runs/images data.demo_images=0 train.precision=${PRECISION:-bf16}"
  {
    python - "$runs/images" <<'EOF' || exit 1
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
      train.max_steps=40 train.micro_batch=16 train.log_every=10 || exit 1
    usp-fast train --stage pretrain --config configs/pretrain/demo.yaml $common run.name=resumed \
      train.max_steps=40 train.micro_batch=16 train.log_every=10 train.ckpt_every=20 train.run_steps=20 || exit 1
    usp-fast train --stage pretrain --config configs/pretrain/demo.yaml --resume auto $common run.name=resumed \
      train.max_steps=40 train.micro_batch=16 train.log_every=10 train.ckpt_every=20 || exit 1
    python - "$runs" <<'EOF' || exit 1
import json, sys
from pathlib import Path
rows = lambda name: [(r["step"], r["loss"]) for r in map(json.loads, (Path(sys.argv[1]) / name / "metrics.jsonl").open())]
a, b = rows("straight"), rows("resumed")
print("straight", a, "\nresumed ", b)
sys.exit(0 if a == b else "resumed bf16 losses differ from the straight run")
EOF
    # a USP-initialised generate run (bf16, EMA) and sampling from it
    usp-fast train --stage generate --config configs/generate/demo.yaml $common \
      generate.init=usp:$runs/straight/export train.max_steps=60 || exit 1
    usp-fast sample --config configs/generate/demo.yaml run.out_dir="$runs" sample.num_images=16 \
      sample.classes=[0,1,2,3] sample.out_dir="$runs/samples" || exit 1  # the demo config's classes are digits 0-9
    python -c "import numpy as np, sys; a = np.load('$runs/samples/samples.npz')['arr_0']; print('samples', a.shape, a.std()); sys.exit(0 if a.std() > 1 else 'blank samples')"
  } > "$OUT/engine.log" 2>&1
}

export OUT WHEELS REPO
export -f env_stage install_stage engine_stage
stage env 10 env_stage
stage install 60 install_stage
stage kernels 120 env USP_FAST_TEST_GPU=1 USP_FAST_CORRECTNESS_JSON="$OUT/correctness.json" \
  python -m pytest -q tests/kernels --junitxml="$OUT/kernels-junit.xml"
stage suite 60 python benchmarks/run.py --suite kernels --out "$OUT"
stage steps 120 python benchmarks/run.py --suite steps --out "$OUT" --repeats 10 --no-compile \
  --cases '^(pretrain/usp_vit_xl/b(128|256)|generate/DiT-XL/2/b(32|256)(/usp-init)?)$'
stage engine 150 engine_stage
stage compile 120 python benchmarks/run.py --suite steps --out "$OUT" --repeats 10 \
  --cases '^(pretrain/usp_vit_xl/b128|generate/DiT-XL/2/b32)$'
stage check 20 bash -c "python benchmarks/run.py --check --out '$OUT' > '$OUT/check.txt' 2>&1; rc=\$?; cat '$OUT/check.txt'; exit \$rc"
stage tune 120 python benchmarks/tune_launch.py --widths 1152 --out "$OUT/launch_table.json"
# charts and the index can be redrawn from the JSON (usp_fast_benchmarks.charts.write_charts): keep 8 files at most
rm -rf "$OUT/.runs" "$OUT"/*.png "$OUT/README.md"
say "total $(( $(date +%s) - START ))s of ${BUDGET_S}s; files: $(ls "$OUT" | tr '\n' ' ')"
