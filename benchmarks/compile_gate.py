"""Hopper compile gate, without a GPU: every Triton kernel launch the fused ops make at the production shapes
(forward and backward, bf16 and fp32, with and without the LayerNorm affine a USP-initialised DiT has; the adaLN
ops also at DiT-XL/2's fine-tuning batch 32) is compiled ahead of time for sm_90a, and the `ptxas -v` that ships
with Triton reports its registers and spills.

`python benchmarks/compile_gate.py [--out FILE]` writes benchmarks/results/compile-sm90-triton<version>.json by
default: the numbers belong to the Triton that compiled them, and a GPU image may ship another one than the venv
(the CPU test gates the installed one; the committed results of others are checked for their schema). How: the
launches are captured instead of run (`JITFunction.__getitem__` records the arguments), their signatures are
derived from the arguments (pointer dtypes, integer widths, constexprs, num_warps), and each distinct variant goes
through `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`. The launch sizing sees an H100 SXM's
132 SMs. Per variant the report gives the occupancy the registers allow (programs and warps per SM, which limit
binds) and per launch its grid (programs, and how much of one wave of resident programs over 132 SMs they fill).
A kernel that fails to compile or spills registers fails the gate (exit 1).
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from usp_fast_benchmarks.env import git_commit, utc_now

SM_COUNT = 132           # H100 SXM (H200: 132 as well)
TARGET = ("cuda", 90, 32)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8"}


@contextlib.contextmanager
def captured_launches():
    """Inside: `kernel[grid](...)` records (kernel, grid, args, kwargs) into the yielded list and does nothing."""
    from triton.runtime.jit import JITFunction

    import usp_fast_kernels._triton_utils as tu

    launches = []
    original, programs = JITFunction.__getitem__, tu.sm_count

    def record(self, grid):
        return lambda *args, **kwargs: launches.append((self, grid, args, kwargs))

    JITFunction.__getitem__ = record
    tu.sm_count = lambda device: SM_COUNT
    try:
        yield launches
    finally:
        JITFunction.__getitem__, tu.sm_count = original, programs


def variant(kernel, args, kwargs):
    """-> (signature, constexprs, attrs, options) of one launch, as triton.compile takes them, specialised as a
    real launch is: an integer equal to 1 becomes a constexpr, and integers and pointers divisible by 16 carry
    tt.divisibility=16 (what Triton's launcher derives from the arguments)."""
    params = kernel.params
    names = [p.name for p in params]
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        v = values[p.name]
        if p.is_constexpr or v is None:  # (Triton specialises a None argument as a constexpr)
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + DTYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                signature[p.name], constexprs[p.name] = "constexpr", 1
                continue
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {p.name} of type {type(v).__name__}")
    return signature, constexprs, attrs, options


def ptxas_report(ptx):
    """PTX -> {registers, spill_stores, spill_loads, ...} from the `ptxas -v` bundled with Triton."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(ptxas), "-v", f"-arch=sm_{TARGET[1]}a", str(src), "-o", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {text[-500:]}")
    get = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"registers": get(r"Used (\d+) registers"), "spill_stores": get(r"(\d+) bytes spill stores"),
            "spill_loads": get(r"(\d+) bytes spill loads"), "stack_bytes": get(r"(\d+) bytes stack frame"),
            "smem_bytes": get(r"(\d+) bytes smem")}


# Hopper per-SM limits: registers, threads, resident blocks, shared memory per block (227 KB opt-in)
SM_REGISTERS, SM_THREADS, SM_BLOCKS, SMEM_PER_BLOCK = 65536, 2048, 32, 227 * 1024


def compile_variant(kernel, signature, constexprs, attrs, options):
    """-> (PTX, shared memory bytes per program) of one variant compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget(*TARGET),
                              options={k: v for k, v in options.items() if k in ("num_warps", "num_stages")})
    return compiled.asm["ptx"], int(compiled.metadata.shared)


def occupancy(registers, num_warps, smem_bytes):
    """{programs_per_sm, warps_per_sm, occupancy (resident threads / 2048), limited_by} that the register file,
    the thread limit, the block limit and shared memory allow."""
    threads = 32 * num_warps
    limits = {"registers": SM_REGISTERS // max(registers * threads, 1), "threads": SM_THREADS // threads,
              "blocks": SM_BLOCKS, "shared_memory": (SMEM_PER_BLOCK + 1024) // smem_bytes if smem_bytes else SM_BLOCKS}
    programs = min(limits.values())
    return {"programs_per_sm": programs, "warps_per_sm": programs * num_warps,
            "occupancy": programs * threads / SM_THREADS, "limited_by": min(limits, key=limits.get)}


def grid_programs(grid):
    n = 1
    for g in (grid if isinstance(grid, (tuple, list)) else (grid,)):
        n *= int(g)
    return n


def production_cases():
    """(name, fn running forward + backward of one op at its production shape) for every fused op's Triton path."""
    return [case for dtype in (torch.bfloat16, torch.float32) for case in _cases(dtype)]


def _cases(dtype):
    import importlib

    from usp_fast_kernels import adaln, masked_tokens

    mse = importlib.import_module("usp_fast_kernels.patch_norm_mse")
    tag = DTYPES[dtype]

    def t(*shape, grad=True, fp32=False):
        return torch.empty(*shape, dtype=torch.float32 if fp32 else dtype).normal_().requires_grad_(grad)

    def run(fn):
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    B, L, K, D, Dd = 256, 196, 49, 1152, 512  # pretrain ViT-XL (25% of 14x14 tokens kept), its 512-wide decoder
    ids = torch.argsort(torch.rand(B, L), 1)
    T = 256  # DiT-XL/2 at 256 px
    cases = [
        (f"keep_gather/{tag}", lambda: run(lambda: masked_tokens.keep_gather_triton(
            t(B, L, D), ids[:, :K], t(L, D, grad=False, fp32=True)))),
        (f"keep_gather/strided/{tag}", lambda: run(lambda: masked_tokens.keep_gather_triton(  # PatchEmbed layout
            t(B, D, L).transpose(1, 2), ids[:, :K], t(L, D, grad=False, fp32=True)))),
        (f"unshuffle/{tag}", lambda: run(lambda: masked_tokens.unshuffle_triton(
            t(B, 1 + K, Dd), t(Dd), torch.argsort(ids, 1), t(1 + L, Dd, grad=False, fp32=True), 1))),
        (f"patch_norm_mse/{tag}", lambda: run(lambda: mse.patch_norm_mse_triton(
            t(B, L, 16), t(B, 4, 28, 28, grad=False), (torch.rand(B, L) < 0.75).to(dtype), 2))),
    ]
    for Bg, b in ((256, ""), (32, "b32/")):  # DiT-XL/2 at batch 256 and at the fine-tuning recipe's 32 per GPU
        cases.append((f"gate_residual/{b}{tag}", lambda Bg=Bg: run(lambda: adaln.gate_residual_triton(
            t(Bg, T, D), t(Bg, D), t(Bg, T, D)))))
        for affine in (False, True):  # DiT's LayerNorm without affine; a USP-initialised DiT's with it
            a = "affine" if affine else "plain"

            def wb(affine=affine):
                return (t(D), t(D)) if affine else (None, None)

            cases += [
                (f"ln_modulate/{a}/strided/{b}{tag}", lambda wb=wb, Bg=Bg: run(lambda: adaln.ln_modulate_triton(
                    t(Bg, D, T).transpose(1, 2), t(Bg, D), t(Bg, D), *wb()))),
                (f"ln_modulate/{a}/{b}{tag}", lambda wb=wb, Bg=Bg: run(lambda: adaln.ln_modulate_triton(
                    t(Bg, T, D), t(Bg, D), t(Bg, D), *wb()))),
                (f"gate_residual_ln_modulate/{a}/{b}{tag}", lambda wb=wb, Bg=Bg: run(
                    lambda: adaln.gate_residual_ln_modulate_triton(t(Bg, T, D), t(Bg, D), t(Bg, T, D), t(Bg, D),
                                                                   t(Bg, D), *wb()))),
            ]
    return cases


def run_gate(cases=None):
    """-> the report: one entry per distinct kernel variant, each with its registers and spills."""
    import triton

    variants, errors = {}, []
    for name, fn in cases or production_cases():
        with captured_launches() as launches:
            fn()
        for kernel, grid, args, kwargs in launches:
            signature, constexprs, attrs, options = variant(kernel, args, kwargs)
            key = json.dumps([kernel.__name__, signature, {k: str(v) for k, v in constexprs.items()}, options],
                             sort_keys=True)
            launch = {"case": name, "programs": grid_programs(grid)}
            if key in variants:
                variants[key]["used_by"].append(name)
                variants[key]["launches"].append(launch)
                continue
            entry = {"kernel": kernel.__name__, "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                     "constexprs": {k: v for k, v in constexprs.items()}, "options": options, "used_by": [name],
                     "launches": [launch]}
            try:
                ptx, shared = compile_variant(kernel, signature, constexprs, attrs, options)
                entry |= ptxas_report(ptx)
                entry["shared_bytes"] = shared
                entry |= occupancy(entry["registers"], options.get("num_warps", 4), shared)
                entry["ok"] = (entry["spill_stores"] == 0 and entry["spill_loads"] == 0
                               and shared <= SMEM_PER_BLOCK)
            except Exception as e:  # noqa: BLE001 - a compile failure is the finding, reported per variant
                entry |= {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
                errors.append(entry)
            variants[key] = entry
    rows = list(variants.values())
    for r in rows:  # the share of one wave of resident programs over all SMs each launch fills (>= 1: full)
        for launch in r["launches"]:
            resident = r.get("programs_per_sm", 0) * SM_COUNT
            launch["wave_fill"] = launch["programs"] / resident if resident else None
    return {"target": f"sm_{TARGET[1]}a (Hopper), warp size {TARGET[2]}", "sm_count_assumed": SM_COUNT,
            "device": f"no GPU: ahead-of-time sm_{TARGET[1]}a compile by Triton {triton.__version__}",
            "triton": triton.__version__, "torch": torch.__version__,
            "date": utc_now(), **git_commit(),
            "variants": rows, "all_ok": all(r["ok"] for r in rows),
            "max_registers": max((r.get("registers", 0) for r in rows), default=0)}


def default_out():
    import triton

    return Path(__file__).resolve().parent / "results" / f"compile-sm90-triton{triton.__version__}.json"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="report file (default: benchmarks/results/compile-sm90-triton<version>.json)")
    args = parser.parse_args(argv)
    args.out = args.out or str(default_out())
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter
    report = run_gate()
    from usp_fast.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    for r in report["variants"]:
        state = "ok   " if r["ok"] else "FAIL "
        detail = r.get("error") or (f"{r['registers']:>3} regs, spills {r['spill_stores']}/{r['spill_loads']} B, "
                                    f"smem {r['shared_bytes']} B, warps {r['options'].get('num_warps', 4)}, "
                                    f"{r['programs_per_sm']} programs/SM ({r['occupancy']:.0%}, {r['limited_by']}), "
                                    f"grid {min(x['programs'] for x in r['launches'])}+ programs")
        print(f"  {state}{r['kernel']:<28} {detail}  ({', '.join(r['used_by'][:3])})")
    print(f"{len(report['variants'])} variants for {report['target']} by Triton {report['triton']}: "
          f"{'all compile without spills' if report['all_ok'] else 'FAILURES above'}; written to {args.out}")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
