"""Measure the launch configuration table of the fused ops on a GPU: for each (op, D, dtype, shape class) at
production shapes, time every candidate (warps per program x programs per SM) forward and backward and keep the
fastest. The shape class is the launch's rows (B x T) by power of two (kernels/_triton_utils.shape_class): the best
programs per SM follow how many rows each program gets, so a batch-32 entry is not used at batch 256. The result is
a table to commit as kernels/launch_table.json; runs read it and never tune at run time (a fixed chunking keeps the
reduction order, and so the bits, the same on every run).

    python benchmarks/tune_launch.py --out kernels/launch_table.json [--batches 32,256] [--widths 1152] [--reps 20]

GPU only (CUDA events). Each entry is written to --out as soon as it is measured (an atomic rewrite, merged into
what the file already holds), so a run stopped by a time limit keeps every entry it finished; --budget-s stops it
before an entry that would not fit. benchmarks/gpu_check.sh runs it as its `tune` stage at the DiT-XL/2 shapes,
before the step cases, which read its table (USP_FAST_LAUNCH_TABLE). Changing an entry changes the backward's
chunking, hence its rounding: retune, rerun `pytest -m gpu tests/kernels`, commit both together.
"""
import argparse
import datetime
import importlib
import json
import sys
import time
from pathlib import Path

import torch

WIDTHS = (768, 1024, 1152)  # DiT/ViT-B, -L, -XL
BATCHES = (32, 256)         # the step cases' smallest and largest per-GPU batch
TOKENS = 256                # DiT at 256 px, patch 2
OPS = ("ln_modulate", "gate_residual", "gate_residual_ln_modulate")
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
    """-> forward fn returning outputs, of one adaLN op with the USP-initialised DiT's LN affine."""
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


def write_table(path, entries, note):
    """Merge `entries` into the table at `path` (same (op, D, dtype, shape class) replaced), atomically."""
    from usp_fast.io import atomic_write_text
    from usp_fast_kernels._triton_utils import shape_class

    key = lambda e: (e["op"], int(e["D"]), e["dtype"], shape_class(e.get("rows")))  # noqa: E731
    old = json.loads(Path(path).read_text()).get("entries", []) if Path(path).is_file() else []
    mine = {key(e) for e in entries}
    merged = [e for e in old if key(e) not in mine] + list(entries)
    atomic_write_text(path, json.dumps({"note": note, "entries": merged}, indent=1) + "\n")


def tune(out, batches=BATCHES, widths=WIDTHS, dtypes=tuple(DTYPES), ops=OPS, reps=20, budget_s=None,
         make_op=_adaln_op, measure=_measure, device=None):
    """Tune every (op, D, dtype, batch) group, writing `out` after each entry. A group is not started when the
    longest one so far would not fit in what is left of `budget_s`. -> the entries measured."""
    tu = importlib.import_module("usp_fast_kernels._triton_utils")
    if device is None:
        from usp_fast_benchmarks.env import device_name

        device = f"{device_name(torch.device('cuda', 0))}, {datetime.date.today().isoformat()}"
    note = (f"Measured by benchmarks/tune_launch.py ({reps} reps, rows = B x {TOKENS} tokens) on {device}; keyed by "
            "(op, D, dtype, shape class = rows by power of two).")
    heuristic, entries, start, longest = tu.launch_config, [], time.monotonic(), 0.0
    groups = [(name, D, tag, B) for name in ops for D in widths for tag in dtypes for B in batches]
    for i, (name, D, tag, B) in enumerate(groups):
        if budget_s is not None and time.monotonic() - start + longest > budget_s:
            print(f"tune: budget of {budget_s}s reached; {len(groups) - i} group(s) not tuned", flush=True)
            break
        t0 = time.monotonic()
        forward = make_op(name, B, TOKENS, D, DTYPES[tag])
        for which in ("fwd", "bwd"):
            op = f"{name}/{which}"
            base = measure(forward, which, reps)
            best = None
            for warps in WARPS:
                for per_sm in PROGRAMS_PER_SM:
                    cand = {"num_warps": warps, "programs_per_sm": per_sm, "source": "candidate"}
                    tu.launch_config = lambda o, *a, cand=cand, op=op, **k: cand if o == op else heuristic(o, *a, **k)
                    try:
                        ms = measure(forward, which, reps)
                    finally:
                        tu.launch_config = heuristic
                    if best is None or ms < best[0]:
                        best = (ms, warps, per_sm)
            entries.append({"op": op, "D": D, "dtype": tag, "rows": B * TOKENS,
                            "shape_class": tu.shape_class(B * TOKENS), "num_warps": best[1],
                            "programs_per_sm": best[2], "ms": round(best[0], 4), "heuristic_ms": round(base, 4), "shape": [B, TOKENS, D], "measured_on": device})
            write_table(out, entries, note)  # now, not at the end: a killed run keeps what it measured
            print(f"{op:<34} D={D:<5} {tag} B={B:<4}: {best[0]:.4f} ms with {best[1]} warps x {best[2]}/SM "
                  f"(heuristic {base:.4f} ms)", flush=True)
        longest = max(longest, time.monotonic() - t0)
    return entries


def main(argv=None):
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    names = lambda s: tuple(v.strip() for v in s.split(",") if v.strip())  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "kernels" / "launch_table.json"))
    parser.add_argument("--batches", type=ints, default=BATCHES, help=f"batch rows of {TOKENS} tokens, comma-separated")
    parser.add_argument("--widths", type=ints, default=WIDTHS,
                        help="row widths D to tune, comma-separated (each new variant costs a compile, ~0.5 s)")
    parser.add_argument("--dtypes", type=names, default=tuple(DTYPES))
    parser.add_argument("--ops", type=names, default=OPS)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=None, help="start no group that would end past this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_launch: needs a CUDA GPU (it times kernels); nothing written", file=sys.stderr)
        return 2
    entries = tune(args.out, args.batches, args.widths, args.dtypes, args.ops, args.reps, args.budget_s)
    print(f"{len(entries)} entries written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
