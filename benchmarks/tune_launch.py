"""Measure the launch configuration table of the fused ops on a GPU: for each (op, D, dtype) at production shapes,
time every candidate (warps per program x programs per SM) forward and backward and keep the fastest. The result
is a table to commit as kernels/launch_table.json; runs read it and never tune at run time (a fixed chunking keeps
the reduction order, and so the bits, the same on every run).

    python benchmarks/tune_launch.py --out kernels/launch_table.json [--batch 32] [--reps 20]

GPU only (CUDA events). benchmarks/gpu_check.sh runs it as its `tune` stage. Changing an entry changes the
backward's chunking, hence its rounding: retune, rerun `pytest -m gpu tests/kernels`, commit both together.
"""
import argparse
import datetime
import importlib
import json
import sys
from pathlib import Path

import torch

from usp_fast_benchmarks.env import device_name

WIDTHS = (768, 1024, 1152)  # DiT/ViT-B, -L, -XL
WARPS = (2, 4, 8, 16)
PROGRAMS_PER_SM = (2, 4, 8, 16, 32)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _time_ms(fn, reps):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _adaln_op(name, B, T, D, dtype):
    """-> (forward fn returning outputs, inputs) of one adaLN op with the USP-initialised DiT's LN affine."""
    adaln = importlib.import_module("usp_fast_kernels.adaln")
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype).requires_grad_()  # noqa: E731
    x, y, vec, w, b = r(B, T, D), r(B, T, D), r(B, 3 * D), r(D), r(D)
    shift, scale, gate = vec.chunk(3, dim=1)
    fns = {"ln_modulate": lambda: adaln.ln_modulate_triton(x, shift, scale, w, b),
           "gate_residual": lambda: adaln.gate_residual_triton(x, gate, y),
           "gate_residual_ln_modulate": lambda: adaln.gate_residual_ln_modulate_triton(x, gate, y, shift, scale, w, b)}
    return fns[name]


def _measure(forward, which, reps):
    if which == "fwd":
        return _time_ms(forward, reps)
    outs = forward()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    return _time_ms(lambda: torch.autograd.backward(outs, grads, retain_graph=True), reps)


def tune(batch, reps, widths=WIDTHS):
    tu = importlib.import_module("usp_fast_kernels._triton_utils")
    heuristic, entries = tu.launch_config, []
    device = f"{device_name(torch.device('cuda', 0))}, {datetime.date.today().isoformat()}"
    for name in ("ln_modulate", "gate_residual", "gate_residual_ln_modulate"):
        for D in widths:
            for tag, dtype in DTYPES.items():
                forward = _adaln_op(name, batch, 256, D, dtype)
                for which in ("fwd", "bwd"):
                    op = f"{name}/{which}"
                    base = _measure(forward, which, reps)
                    best = None
                    for warps in WARPS:
                        for per_sm in PROGRAMS_PER_SM:
                            cand = {"num_warps": warps, "programs_per_sm": per_sm, "source": "candidate"}
                            tu.launch_config = lambda o, *a, cand=cand, op=op: cand if o == op else heuristic(o, *a)
                            try:
                                ms = _measure(forward, which, reps)
                            finally:
                                tu.launch_config = heuristic
                            if best is None or ms < best[0]:
                                best = (ms, warps, per_sm)
                    entries.append({"op": op, "D": D, "dtype": tag, "num_warps": best[1], "programs_per_sm": best[2],
                                    "ms": round(best[0], 4), "heuristic_ms": round(base, 4),
                                    "shape": [batch, 256, D], "measured_on": device})
                    print(f"{op:<34} D={D:<5} {tag}: {best[0]:.4f} ms with {best[1]} warps x {best[2]}/SM "
                          f"(heuristic {base:.4f} ms)", flush=True)
    return {"note": f"Measured by benchmarks/tune_launch.py (batch {batch}, {reps} reps) on {device}.",
            "entries": entries}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "kernels" / "launch_table.json"))
    parser.add_argument("--batch", type=int, default=32, help="batch rows of 256 tokens (DiT-XL/2 at 256 px)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)),
                        help="row widths D to tune, comma-separated (each new variant costs a compile, ~1-2 s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_launch: needs a CUDA GPU (it times kernels); nothing written", file=sys.stderr)
        return 2
    table = tune(args.batch, args.reps, [int(w) for w in args.widths.split(",")])
    from usp_fast.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(table, indent=1) + "\n")
    print(f"{len(table['entries'])} entries written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
