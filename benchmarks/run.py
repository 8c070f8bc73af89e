"""Benchmark suites. `python benchmarks/run.py [--suite kernels|steps|cost|...|all] [--check [RESULTS]] [--out DIR]
[--tiny] [--cases REGEX]`

Each suite is a function registered with `@suite(name)`; it takes the run context and returns a JSON-able dict.
Results of a run are merged into <out>/<device-slug>.json (one file per device, one entry per suite, each with
the date, git commit and library versions it was taken with) and printed as a table.
  kernels  the fused ops against their references (this file)
  data     decode, augment and VAE-encode throughput of the input pipeline (data_suite.py)
  steps    whole training steps of the paper models against reference and torch.compile baselines (steps.py)
  cost     GPU-days of the paper's pipeline from the measured img/s, beside the paper's (cost.py)
`--check` compares this device's newest results (or the RESULTS file given) with benchmarks/targets.yaml and
exits 1 with a per-row report when a threshold is missed. With no --suite it only checks; with none of the two it
runs all suites.

Without CUDA the suites run at tiny shapes on CPU, the Triton kernels through the interpreter: a smoke test of
the benchmark code and of kernel correctness, not performance data. No GPU figures are produced there.
"""
import argparse
import datetime
import fnmatch
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

if not torch.cuda.is_available():  # must precede the first import of triton / kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]

SUITES = {}    # name -> fn(ctx) -> JSON-able dict
PRINTERS = {}  # name -> fn(result, ctx) printing the suite's table


def suite(name, printer=None):
    """Register `fn(ctx) -> dict` as the suite `name`, with an optional table printer."""
    def register(fn):
        SUITES[name] = fn
        if printer is not None:
            PRINTERS[name] = printer
        return fn
    return register


# ---- run context, environment record, timing ----

@dataclass
class Context:
    device: torch.device
    tiny: bool
    cases: str = None      # regex selecting step cases by name (all when None)
    warmup: int = 5        # untimed steps before timing (GPU; torch.compile compiles there)
    repeats: int = 20      # timed steps (GPU)
    results: dict = field(default_factory=dict)  # this run's suite results so far, by name
    stored: dict = None    # this device's results file as it was before the run
    compile: bool = True   # steps suite: include the torch.compile baselines (GPU)
    preset: str = "cpu"    # fidelity suite: its preset, work folder and results folder
    work: str = None
    out: str = None

    @property
    def on_gpu(self):
        return self.device.type == "cuda"


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine() or 'unknown'}"


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit():
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def environment(ctx):
    import triton

    return {
        "device": device_name(ctx.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if ctx.on_gpu else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def time_ms(ctx, fn, grad_to_none=None):
    """Median milliseconds of fn(): triton's do_bench on CUDA, a few wall-clock runs on CPU."""
    if ctx.on_gpu:
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    fn()  # warm-up (kernel set-up)
    runs = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def time_backward_ms(ctx, forward, backward, leaves, reps=50):
    """Median milliseconds of backward(forward()) with the forward untimed; L2 flushed before each timed run on
    CUDA as do_bench does. (Timing backward alone with retain_graph is not possible for every implementation:
    torch.compile's donated buffers forbid it.)"""
    runs = []
    warmup, reps = (3, reps) if ctx.on_gpu else (1, 3)
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device=ctx.device) if ctx.on_gpu else None
    for i in range(warmup + reps):
        for t in leaves:
            t.grad = None
        outs = forward()
        if ctx.on_gpu:
            cache.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            backward(outs)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            start = time.perf_counter()
            backward(outs)
            ms = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            runs.append(ms)
    return statistics.median(runs)


def peak_mib(ctx, fn):
    """Peak memory fn() allocates above what was allocated before it (CUDA only)."""
    if not ctx.on_gpu:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    before = torch.cuda.memory_allocated(ctx.device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(ctx.device) - before) / 2**20


def copy_bandwidth_gbps(ctx):
    """Device-to-device copy bandwidth (read + write bytes per second), the yardstick for memory-bound kernels."""
    if not ctx.on_gpu:
        return None
    src = torch.empty(2**27, dtype=torch.bfloat16, device=ctx.device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(ctx, lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


# ---- kernels suite ----

# Issue targets, on the same GPU in bf16, judged on fwd+bwd. For the masked ops the eager reference is the
# advanced-indexing implementation, so "vs_adv_index" is the speed-up over it.
KERNEL_TARGETS = {
    "keep_gather": {"vs_mae_gather": 3.0, "vs_adv_index": 1.2, "copy_bw_fraction": 0.6},
    "unshuffle": {"vs_mae_gather": 3.0, "vs_adv_index": 1.2, "copy_bw_fraction": 0.6},
    "patch_norm_mse": {"vs_eager": 3.0, "vs_compile": 1.3},
    "ln_modulate": {"vs_eager": 2.0, "vs_compile": 1.1, "copy_bw_fraction": 0.7},
    "gate_residual": {"vs_eager": 2.0, "vs_compile": 1.1, "copy_bw_fraction": 0.7},
    "gate_residual_ln_modulate": {"vs_eager": 2.0, "vs_compile": 1.1, "copy_bw_fraction": 0.7},
}
BASELINE_OF_TARGET = {"vs_mae_gather": "mae_gather", "vs_adv_index": "eager", "vs_eager": "eager",
                      "vs_compile": "compile"}


@dataclass
class KernelCase:
    """One op at one shape: zero-argument implementations over shared inputs, the leaves that get gradients,
    and the minimum bytes each direction must move (for achieved bandwidth)."""
    op: str
    shape: dict
    impls: dict
    leaves: list
    bytes_fwd: int
    bytes_bwd: int


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class _Inputs:
    """Seeded random tensors on the run's device."""

    def __init__(self, ctx, dtype):
        self.device, self.dtype = ctx.device, dtype
        self.gen = torch.Generator(device=ctx.device)
        self.gen.manual_seed(0)

    def randn(self, *shape, dtype=None, grad=False):
        t = torch.randn(*shape, generator=self.gen, device=self.device).to(dtype or self.dtype)
        return t.requires_grad_(grad)

    def permutations(self, B, L):
        """Per-row random permutations, as the model masks: argsort of uniform noise."""
        return torch.argsort(torch.rand(B, L, generator=self.gen, device=self.device), dim=1)

    def meta(self, *shape):
        """A shape-only tensor in the run's dtype, for byte counts."""
        return torch.empty(*shape, dtype=self.dtype, device="meta")


def _keep_gather_case(ctx, inp):
    """Encoder keep-gather, pretrain ViT-XL; the pos-emb is a fixed fp32 buffer, x gets the gradient."""
    from usp_fast_kernels import masked_tokens

    B, L, K, D = (2, 16, 4, 64) if ctx.tiny else (256, 196, 49, 1152)
    x, pos, ids = inp.randn(B, L, D, grad=True), inp.randn(L, D, dtype=torch.float32), inp.permutations(B, L)[:, :K]
    visible = inp.meta(B, K, D)
    return KernelCase("keep_gather", dict(B=B, L=L, K=K, D=D), {
        "triton": lambda: masked_tokens.keep_gather_triton(x, ids, pos),
        "eager": lambda: masked_tokens.keep_gather_reference(x, ids, pos),
        # MAE: pos-emb added to every token, then torch.gather with the ids repeated over the width
        "mae_gather": lambda: torch.gather(x + pos.to(x.dtype), 1, ids.unsqueeze(-1).repeat(1, 1, D)),
    }, [x], bytes_fwd=2 * _nbytes(visible) + _nbytes(pos, ids), bytes_bwd=_nbytes(visible, x, ids))


def _unshuffle_case(ctx, inp):
    """Decoder unshuffle, pretrain ViT-XL decoder (width 512, one cls prefix); y and the mask token get grads."""
    from usp_fast_kernels import masked_tokens

    B, L, K, D, P = (2, 16, 4, 32, 1) if ctx.tiny else (256, 196, 49, 512, 1)
    y, mask_token = inp.randn(B, P + K, D, grad=True), inp.randn(D, grad=True)
    pos, ids_restore = inp.randn(P + L, D, dtype=torch.float32), torch.argsort(inp.permutations(B, L), dim=1)

    def mae_unshuffle():
        tokens = torch.cat([y[:, P:], mask_token.view(1, 1, D).expand(B, L - K, D)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
        return torch.cat([y[:, :P], tokens], dim=1) + pos.to(y.dtype)

    full = inp.meta(B, P + L, D)
    return KernelCase("unshuffle", dict(B=B, L=L, K=K, D=D, num_prefix=P), {
        "triton": lambda: masked_tokens.unshuffle_triton(y, mask_token, ids_restore, pos, P),
        "eager": lambda: masked_tokens.unshuffle_reference(y, mask_token, ids_restore, pos, P),
        "mae_gather": mae_unshuffle,
    }, [y, mask_token], bytes_fwd=_nbytes(y, full, pos, ids_restore), bytes_bwd=_nbytes(full, y, ids_restore))


def _patch_norm_mse_case(ctx, inp):
    """Norm-pix MSE on the pretrain decoder's prediction: 28x28x4 latents in 2x2 patches."""
    mse = importlib.import_module("usp_fast_kernels.patch_norm_mse")  # the package attribute is the dispatcher

    B, C, side, p = (2, 4, 8, 2) if ctx.tiny else (256, 4, 28, 2)
    L = (side // p) ** 2
    pred, target = inp.randn(B, L, p * p * C, grad=True), inp.randn(B, C, side, side)
    mask = (torch.rand(B, L, generator=inp.gen, device=inp.device) < 0.75).float()
    return KernelCase("patch_norm_mse", dict(B=B, C=C, H=side, W=side, patch=p), {
        "triton": lambda: mse.patch_norm_mse_triton(pred, target, mask, p),
        "eager": lambda: mse.patch_norm_mse_reference(pred, target, mask, p),
    }, [pred], bytes_fwd=_nbytes(pred, target, mask), bytes_bwd=_nbytes(pred, target, mask, pred))


def _adaln_cases(ctx, inp):
    """The adaLN ops at DiT-XL/2, 256px (no LayerNorm affine, as DiT)."""
    from usp_fast_kernels import adaln

    B, T, D = (2, 8, 64) if ctx.tiny else (256, 256, 1152)
    x, y = inp.randn(B, T, D, grad=True), inp.randn(B, T, D, grad=True)
    shift, scale, gate = (inp.randn(B, D, grad=True) for _ in range(3))
    act, vec = _nbytes(inp.meta(B, T, D)), _nbytes(inp.meta(B, D))
    shape = dict(B=B, T=T, D=D)
    ln = _liger_layer_norm(ctx, D, x)  # the peer kernel library's Triton LayerNorm, when installed (GPU)
    peer = (lambda h: ln(h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)) if ln else None
    return [
        KernelCase("ln_modulate", shape, {
            "triton": lambda: adaln.ln_modulate_triton(x, shift, scale),
            "eager": lambda: adaln.ln_modulate_reference(x, shift, scale),
            **({"liger": lambda: peer(x)} if peer else {}),
        }, [x, shift, scale], bytes_fwd=2 * act + 2 * vec, bytes_bwd=3 * act + 3 * vec),
        KernelCase("gate_residual", shape, {  # backward: d(x) is d(out) itself
            "triton": lambda: adaln.gate_residual_triton(x, gate, y),
            "eager": lambda: adaln.gate_residual_reference(x, gate, y),
        }, [x, gate, y], bytes_fwd=3 * act + vec, bytes_bwd=3 * act + 2 * vec),
        KernelCase("gate_residual_ln_modulate", shape, {
            "triton": lambda: adaln.gate_residual_ln_modulate_triton(x, gate, y, shift, scale),
            "eager": lambda: adaln.gate_residual_ln_modulate_reference(x, gate, y, shift, scale),
            **({"liger": lambda: (lambda x1: (x1, peer(x1)))(adaln.gate_residual_reference(x, gate, y))}
               if peer else {}),
        }, [x, gate, y, shift, scale], bytes_fwd=4 * act + 3 * vec, bytes_bwd=6 * act + 5 * vec),
    ]


def _liger_layer_norm(ctx, D, like):
    """liger-kernel's LayerNorm as h -> LN(h) (unit weight, zero bias: DiT's affine-free norm), or None when
    liger-kernel is not installed or this is not a GPU run. A peer, timed beside eager and compile."""
    if not ctx.on_gpu:
        return None
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        return None
    w, b = torch.ones(D, device=like.device, dtype=like.dtype), torch.zeros(D, device=like.device, dtype=like.dtype)
    return lambda h: LigerLayerNormFunction.apply(h, w, b, 1e-6)


def _kernel_cases(ctx, dtype):
    inp = _Inputs(ctx, dtype)
    return [_keep_gather_case(ctx, inp), _unshuffle_case(ctx, inp), _patch_norm_mse_case(ctx, inp),
            *_adaln_cases(ctx, inp)]


def _compiled_reference(case):
    """torch.compile of the eager reference, called on the same inputs."""
    return torch.compile(case.impls["eager"], dynamic=False)


def _as_tuple(outs):
    return outs if isinstance(outs, tuple) else (outs,)


def _measure(ctx, case, impl, copy_gbps):
    upstream = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in _as_tuple(impl())]

    def backward(outs):
        torch.autograd.backward(_as_tuple(outs), upstream)

    def forward_backward():
        backward(impl())

    row = {
        "fwd_ms": time_ms(ctx, impl, grad_to_none=case.leaves),
        "bwd_ms": time_backward_ms(ctx, impl, backward, case.leaves),
        "fwd_bwd_ms": time_ms(ctx, forward_backward, grad_to_none=case.leaves),
        "peak_mib": peak_mib(ctx, forward_backward),
    }
    if ctx.on_gpu:
        for mode, nbytes in (("fwd", case.bytes_fwd), ("bwd", case.bytes_bwd),
                             ("fwd_bwd", case.bytes_fwd + case.bytes_bwd)):
            row[f"gbps_{mode}"] = nbytes / row[f"{mode}_ms"] / 1e6
            row[f"copy_bw_fraction_{mode}"] = row[f"gbps_{mode}"] / copy_gbps
    for t in case.leaves:
        t.grad = None
    return row


def _max_error(case):
    """Largest |Triton - eager| over the outputs and the leaves' gradients, each relative to the largest |eager|:
    a correctness check at the benchmarked shape and dtype."""
    def run(impl):
        for t in case.leaves:
            t.grad = None
        outs = _as_tuple(impl())
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return [o.detach().float() for o in outs] + [t.grad.float() for t in case.leaves]

    got, want = run(case.impls["triton"]), run(case.impls["eager"])
    for t in case.leaves:
        t.grad = None
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(got, want))


@suite("kernels", printer=lambda result, ctx: _print_kernels(result, ctx.on_gpu))
def kernels_suite(ctx):
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32  # bf16 arithmetic is broken in the interpreter
    copy_gbps = copy_bandwidth_gbps(ctx)
    ops = {}
    for case in _kernel_cases(ctx, dtype):
        if ctx.on_gpu:
            case.impls["compile"] = _compiled_reference(case)
        impls = {name: _measure(ctx, case, impl, copy_gbps) for name, impl in case.impls.items()}
        entry = {"shape": case.shape, "dtype": str(dtype).replace("torch.", ""), "max_rel_error_vs_eager":
                 _max_error(case), "impls": impls}
        if ctx.on_gpu:
            mine = impls["triton"]
            entry["speedup"] = {f"vs_{name}": {mode: other[f"{mode}_ms"] / mine[f"{mode}_ms"]
                                               for mode in ("fwd", "bwd", "fwd_bwd")}
                                for name, other in impls.items() if name != "triton"}
            entry["speedup"]["vs_adv_index"] = entry["speedup"]["vs_eager"]
        entry["targets"] = KERNEL_TARGETS[case.op]
        entry["targets_met"] = _targets_met(entry) if ctx.on_gpu else None
        ops[case.op] = entry
    hbm = steps.DATASHEET_HBM_TBPS.get(torch.cuda.get_device_name(ctx.device)) if ctx.on_gpu else None
    return {
        "copy_bandwidth_gbps": copy_gbps,
        "datasheet_bandwidth_gbps": hbm * 1000 if hbm else None,  # beside the measured copy rate the fractions use
        "timing": ("median ms; fwd and fwd+bwd by triton.testing.do_bench, bwd by CUDA events around backward after "
                   "an untimed forward; GB/s from the minimum bytes each op must move" if ctx.on_gpu else
                   "CPU through the Triton interpreter at tiny shapes: wall-clock smoke timings, NOT performance "
                   "data; no GPU figures, no torch.compile, no speed-ups or bandwidths"),
        "ops": ops,
    }


def _targets_met(entry):
    met = {}
    for target, wanted in entry["targets"].items():
        if target == "copy_bw_fraction":
            got = entry["impls"]["triton"]["copy_bw_fraction_fwd_bwd"]
        else:
            got = entry["speedup"][f"vs_{BASELINE_OF_TARGET[target]}"]["fwd_bwd"]
        met[target] = {"wanted": wanted, "got": got, "met": got >= wanted}
    return met


def _print_kernels(result, on_gpu):
    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"copy bandwidth: {fmt(result['copy_bandwidth_gbps'], '.0f')} GB/s   ({result['timing']})")
    header = f"{'op':<27}{'impl':<12}{'fwd ms':>10}{'bwd ms':>10}{'f+b ms':>10}{'x triton':>10}{'GB/s':>8}" \
             f"{'%copy':>7}{'MiB':>9}"
    print(header)
    print("-" * len(header))
    for op, entry in result["ops"].items():
        mine = entry["impls"]["triton"]["fwd_bwd_ms"]
        for name, row in entry["impls"].items():
            ratio = row["fwd_bwd_ms"] / mine if on_gpu and name != "triton" else None
            frac = row.get("copy_bw_fraction_fwd_bwd")
            print(f"{op:<27}{name:<12}{row['fwd_ms']:>10.3f}{row['bwd_ms']:>10.3f}{row['fwd_bwd_ms']:>10.3f}"
                  f"{fmt(ratio, '.2f'):>10}{fmt(row.get('gbps_fwd_bwd'), '.0f'):>8}"
                  f"{fmt(frac * 100 if frac is not None else None, '.0f'):>7}{fmt(row['peak_mib'], '.1f'):>9}")
        met = entry["targets_met"]
        if met:
            print(" " * 27 + "targets: " + ", ".join(
                f"{k} {v['got']:.2f}/{v['wanted']} {'ok' if v['met'] else 'MISSED'}" for k, v in met.items()))
        print(" " * 27 + f"max rel. error vs eager (outputs and grads): {entry['max_rel_error_vs_eager']:.2e}")


# ---- suites in their own modules; `--suite all` runs them in ALL_ORDER, then any others ----

from usp_fast_benchmarks import cost, steps  # noqa: E402 (after TRITON_INTERPRET is set)
from usp_fast_benchmarks.data_suite import data_suite, print_data  # noqa: E402

suite("data", printer=print_data)(data_suite)
suite("steps", printer=steps.print_steps)(steps.steps_suite)
suite("cost", printer=cost.print_cost)(cost.cost_suite)
ALL_ORDER = ("kernels", "data", "steps", "cost")  # cost reuses the steps results of the same run
NOT_IN_ALL = ("fidelity",)  # an experiment of its own (minutes to hours): only when asked for by name


@suite("fidelity")
def fidelity_suite(ctx):
    """USP init against scratch on real images (fidelity.py): writes its own fidelity-<device>-<preset>.* files."""
    from usp_fast_benchmarks.fidelity import run_fidelity

    return run_fidelity(ctx.preset, ctx.work, ctx.out)


# ---- --check ----

TARGETS = Path(__file__).resolve().parent / "targets.yaml"


# Largest relative error of a kernel's outputs and gradients against eager that --check accepts, by dtype: a fast
# but wrong kernel must not pass
ERROR_TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3, "float32": 1e-4}


def _kernel_checks(record):
    """Every op's error against eager (any device), and the kernels suite's own speed targets (KERNEL_TARGETS),
    judged where it ran on a GPU."""
    for op, entry in record["suites"].get("kernels", {}).get("ops", {}).items():
        tol = ERROR_TOLERANCE.get(entry.get("dtype"), 1e-4)
        err = entry.get("max_rel_error_vs_eager")
        yield f"kernels/{op}", "max_rel_error_vs_eager", err, f"<= {tol:g}", err is not None and err <= tol
        for target, met in (entry.get("targets_met") or {}).items():
            yield f"kernels/{op}", target, met["got"], f">= {met['wanted']}", met["met"]


def _target_checks(record, targets):
    """targets: {suite: [{row: glob, metric: name, min: x and/or max: y}]} against each suite's `rows`; a suite
    whose results lack rows a full run has (a --cases subset) is missed as well."""
    for suite_name, items in targets.items():
        result = record["suites"].get(suite_name, {})
        rows = result.get("rows", {})
        absent = sorted(set(result.get("expected_rows", [])) - set(rows))
        if absent:
            yield (f"{suite_name}/(partial run: {len(absent)} rows absent, e.g. {absent[0]})", "rows", None,
                   "a full run", False)
        for t in items:
            bounds = " and ".join(f"{op} {t[k]}" for k, op in (("min", ">="), ("max", "<=")) if k in t)
            matched = fnmatch.filter(rows, t["row"])
            if not matched:
                yield f"{suite_name}/{t['row']}", t["metric"], None, bounds, False
            for key in matched:
                got = rows[key].get(t["metric"])
                ok = got is not None and got >= t.get("min", -float("inf")) and got <= t.get("max", float("inf"))
                yield f"{suite_name}/{key}", t["metric"], got, bounds, ok


def device_targets(device, targets_path=TARGETS):
    """The thresholds of the device named `device` (a name or slug), {} when it has none."""
    return (yaml.safe_load(Path(targets_path).read_text()) or {}).get(slug(device)) or {}


def check(results_path, targets_path=TARGETS):
    """Print one line per target and return 1 if any is missed (absent results count as missed), else 0."""
    record = json.loads(Path(results_path).read_text())
    device = slug(record["device"])
    targets = device_targets(device, targets_path)
    rows = [*_kernel_checks(record), *_target_checks(record, targets)]
    if not targets:
        print(f"check {results_path}: no targets for this device ({device}) in {targets_path}: its speed is not "
              "judged" + ("; only kernel correctness is" if rows else "; nothing was checked"))
        if not rows:
            return 1
    print(f"check {results_path} ({record['device']}, {record.get('date')}, commit {record.get('commit')}) "
          f"against {targets_path}:")
    for row, metric, got, wanted, ok in rows:
        shown = "absent" if got is None else format(got, ".4g")
        print(f"  {'ok    ' if ok else 'MISSED'} {row:<48} {metric:<28} {shown:>10}  (wanted {wanted})")
    missed = sum(not r[-1] for r in rows)
    print(f"{len(rows) - missed} of {len(rows)} targets met" + (f"; {missed} MISSED" if missed else ""))
    return 1 if missed else 0


# ---- CLI ----

def write_results(out_dir, env, results):
    """Merge this run's suites into <out_dir>/<device-slug>.json, keeping other suites' earlier results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slug(env['device'])}.json"
    record = json.loads(path.read_text()) if path.exists() else {"suites": {}}
    record.update(env)
    for name, result in results.items():
        old = record["suites"].get(name, {})
        if "rows" in result and "rows" in old:  # a --cases subset updates its rows and keeps the others
            stamp = {"date": env["date"], "commit": env.get("commit")}
            rows = {**old["rows"], **{k: {**v, "measured": stamp} for k, v in result["rows"].items()}}
            result = {**result, "rows": rows}
        record["suites"][name] = {**env, **result}
    path.write_text(json.dumps(record, indent=2) + "\n")
    from usp_fast_benchmarks.charts import write_charts

    write_charts(path)
    return path


def suite_names(arg):
    """'all' -> every suite, ALL_ORDER first; 'steps,cost' -> those, in the order given."""
    if arg == "all":
        return [n for n in ALL_ORDER if n in SUITES] + [n for n in SUITES if n not in ALL_ORDER + NOT_IN_ALL]
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)} or all")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=suite_names, help=f"suites to run, comma-separated, from {', '.join(SUITES)}; "
                        "or all (the default, unless --check is given alone)")
    parser.add_argument("--check", nargs="?", const="", metavar="RESULTS",
                        help="compare results with benchmarks/targets.yaml (default file: this device's in --out)")
    parser.add_argument("--targets", default=str(TARGETS), help="thresholds file for --check")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes even on a GPU (always so on CPU)")
    parser.add_argument("--cases", help="steps suite: only cases whose name matches this regex, e.g. 'XL'")
    parser.add_argument("--repeats", type=int, default=20, help="steps suite: timed steps per case (GPU)")
    parser.add_argument("--no-compile", action="store_true", help="steps suite: skip the torch.compile baselines")
    parser.add_argument("--preset", default="cpu", help="fidelity suite: configs/fidelity/<preset>.yaml (smoke, cpu, "
                        "gpu) or a YAML path")
    parser.add_argument("--work", default=None, help="fidelity suite: folder of its runs (default "
                        "runs/fidelity-<preset>); a rerun continues there")
    args = parser.parse_args(argv)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ctx = Context(device=device, tiny=args.tiny or device.type != "cuda", cases=args.cases, repeats=args.repeats,
                  compile=not args.no_compile, preset=args.preset, work=args.work, out=args.out)
    env = environment(ctx)
    own_file = Path(args.out) / f"{slug(env['device'])}.json"
    names = args.suite or (suite_names("all") if args.check is None else [])
    if names:
        if not ctx.on_gpu and set(names) - set(NOT_IN_ALL):
            print("NO GPU: running on CPU through the Triton interpreter at tiny shapes. GPU figures are absent; "
                  "the times below only show that the benchmarks run.")
        ctx.stored = json.loads(own_file.read_text()) if own_file.exists() else None
        for name in names:
            print(f"== suite {name} on {env['device']} ==")
            ctx.results[name] = SUITES[name](ctx)
            printer = PRINTERS.get(name)
            if printer:
                printer(ctx.results[name], ctx)
            path = write_results(args.out, env, {name: ctx.results[name]})  # after each suite: nothing is lost
        print(f"results: {path}")
    if args.check is not None:
        path = Path(args.check) if args.check else own_file
        if not path.exists():
            if not args.check and not device_targets(env["device"], args.targets):
                print(f"check: no results file {path} and no targets for this device ({slug(env['device'])}): "
                      "nothing was checked")
                return 1
            print(f"check: no results file {path}; run a suite first")
            return 1
        return check(path, args.targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
