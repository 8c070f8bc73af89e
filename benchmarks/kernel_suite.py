"""The `kernels` suite: every fused op's Triton path against its eager reference (and torch.compile of it on a GPU,
and MAE's gather or liger-kernel where a case has them), forward, backward and both, with the error against eager
at the benchmarked shape and dtype. The cases are in kernel_<op>.py; the speed targets in targets.yaml (`_kernels`).

Timing: on CUDA, median ms of triton.testing.do_bench (forward, forward + backward) and of CUDA events around the
backward after an untimed forward; GB/s from the minimum bytes each op must move (benchmarks/roofline.py), as a
fraction of the datasheet HBM bandwidth (the targets') and of the device-to-device copy rate. On CPU the Triton
interpreter at tiny shapes: smoke timings, no speed-ups, bandwidths or torch.compile.
"""
import statistics
import time

import torch

from usp_fast_benchmarks import kernel_adaln, kernel_masked_tokens, kernel_patch_norm_mse
from usp_fast_benchmarks.env import DATASHEET_HBM_TBPS, device_name
from usp_fast_benchmarks.kernel_case import Inputs
from usp_fast_benchmarks.targets import kernel_speed_targets

OP_MODULES = (kernel_masked_tokens, kernel_patch_norm_mse, kernel_adaln)  # in this order: they share one generator
MODES = ("fwd", "bwd", "fwd_bwd")
# the implementation each speed target of targets.yaml compares against
BASELINE_OF_TARGET = {"vs_mae_gather": "mae_gather", "vs_adv_index": "eager", "vs_eager": "eager",
                      "vs_compile": "compile"}


# ---- timing ----

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


# ---- one case ----

def _as_tuple(outs):
    return outs if isinstance(outs, tuple) else (outs,)


def measure(ctx, case, impl, copy_gbps, hbm_gbps):
    """One implementation's row: fwd, bwd and fwd+bwd ms, peak memory; on a GPU the achieved GB/s of the fused
    op's minimal bytes (benchmarks/roofline.py) and their fraction of the copy bandwidth and of the datasheet HBM
    bandwidth (the op's roofline)."""
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
            row[f"hbm_bw_fraction_{mode}"] = row[f"gbps_{mode}"] / hbm_gbps if hbm_gbps else None
    for t in case.leaves:
        t.grad = None
    return row


def max_error(case):
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


def targets_met(entry):
    """{target: {wanted, got, met}} of one op's entry (GPU runs): speed-ups fwd+bwd, or the fraction of the
    datasheet HBM bandwidth (None, hence missed, on a GPU env.py has no datasheet figure for)."""
    met = {}
    for target, wanted in entry["targets"].items():
        if target == "hbm_bw_fraction":
            got = entry["impls"]["triton"]["hbm_bw_fraction_fwd_bwd"]
        else:
            got = entry["speedup"][f"vs_{BASELINE_OF_TARGET[target]}"]["fwd_bwd"]
        met[target] = {"wanted": wanted, "got": got, "met": got is not None and got >= wanted}
    return met


def op_entry(ctx, case, dtype, copy_gbps, hbm_gbps):
    """The results entry of one op: every implementation's row, the error against eager, speed-ups and targets."""
    if ctx.on_gpu:
        case.impls["compile"] = torch.compile(case.impls["eager"], dynamic=False)  # on the same inputs
    impls = {name: measure(ctx, case, impl, copy_gbps, hbm_gbps) for name, impl in case.impls.items()}
    entry = {"shape": case.shape, "dtype": str(dtype).replace("torch.", ""),
             "max_rel_error_vs_eager": max_error(case), "impls": impls}
    if ctx.on_gpu:
        mine = impls["triton"]
        entry["speedup"] = {f"vs_{name}": {mode: other[f"{mode}_ms"] / mine[f"{mode}_ms"] for mode in MODES}
                            for name, other in impls.items() if name != "triton"}
        entry["speedup"]["vs_adv_index"] = entry["speedup"]["vs_eager"]
    entry["targets"] = kernel_speed_targets(case.op)
    entry["targets_met"] = targets_met(entry) if ctx.on_gpu else None
    return entry


# ---- the suite ----

def kernels_suite(ctx):
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32  # bf16 arithmetic is broken in the interpreter
    copy_gbps = copy_bandwidth_gbps(ctx)
    inp = Inputs(ctx, dtype)
    cases = [case for module in OP_MODULES for case in module.cases(ctx, inp)]
    hbm = DATASHEET_HBM_TBPS.get(device_name(ctx.device)) if ctx.on_gpu else None
    ops = {case.op: op_entry(ctx, case, dtype, copy_gbps, hbm * 1000 if hbm else None) for case in cases}
    return {
        "copy_bandwidth_gbps": copy_gbps,
        "datasheet_bandwidth_gbps": hbm * 1000 if hbm else None,  # what hbm_bw_fraction (the targets') divides by
        "timing": ("median ms; fwd and fwd+bwd by triton.testing.do_bench, bwd by CUDA events around backward after "
                   "an untimed forward; GB/s from the minimum bytes each op must move" if ctx.on_gpu else
                   "CPU through the Triton interpreter at tiny shapes: wall-clock smoke timings, NOT performance "
                   "data; no GPU figures, no torch.compile, no speed-ups or bandwidths"),
        "ops": ops,
    }


def print_kernels(result, ctx):
    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"copy bandwidth: {fmt(result['copy_bandwidth_gbps'], '.0f')} GB/s   ({result['timing']})")
    header = f"{'op':<27}{'impl':<12}{'fwd ms':>10}{'bwd ms':>10}{'f+b ms':>10}{'x triton':>10}{'GB/s':>8}" \
             f"{'%HBM':>7}{'MiB':>9}"
    print(header)
    print("-" * len(header))
    for op, entry in result["ops"].items():
        mine = entry["impls"]["triton"]["fwd_bwd_ms"]
        for name, row in entry["impls"].items():
            ratio = row["fwd_bwd_ms"] / mine if ctx.on_gpu and name != "triton" else None
            frac = row.get("hbm_bw_fraction_fwd_bwd")
            print(f"{op:<27}{name:<12}{row['fwd_ms']:>10.3f}{row['bwd_ms']:>10.3f}{row['fwd_bwd_ms']:>10.3f}"
                  f"{fmt(ratio, '.2f'):>10}{fmt(row.get('gbps_fwd_bwd'), '.0f'):>8}"
                  f"{fmt(frac * 100 if frac is not None else None, '.0f'):>7}{fmt(row['peak_mib'], '.1f'):>9}")
        met = entry["targets_met"]
        if met:
            print(" " * 27 + "targets: " + ", ".join(
                f"{k} {v['got']:.2f}/{v['wanted']} {'ok' if v['met'] else 'MISSED'}" for k, v in met.items()))
        print(" " * 27 + f"max rel. error vs eager (outputs and grads): {entry['max_rel_error_vs_eager']:.2e}")
