"""The Hopper compile gate: every Triton kernel variant the fused ops launch at production shapes compiles for
sm_90a without register spills (ptxas -v), checked on a CPU-only machine with the installed (pinned) Triton; the
committed results, one per Triton (the pinned one and the GPU image's 3.6), hold the same variants and schema."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
GPU_IMAGE_TRITON = "3.6.0"  # the Triton of the GPU image (docs/performance.md)
KERNELS = {"_move_rows_kernel", "_patch_norm_mse_kernel", "_adaln_fwd_kernel", "_adaln_bwd_kernel",
           "_adaln_finalize_kernel"}


def check_report(report, version):
    """What every gate report must show, whichever Triton compiled it."""
    assert report["all_ok"] and report["target"].startswith("sm_90a") and report["triton"] == version
    assert {v["kernel"] for v in report["variants"]} == KERNELS
    used = {name for v in report["variants"] for name in v["used_by"]}
    for op in ("keep_gather", "unshuffle", "patch_norm_mse", "gate_residual", "ln_modulate/plain",
               "ln_modulate/affine", "gate_residual_ln_modulate/affine", "gate_residual_ln_modulate/plain/b32"):
        assert {f"{op}/bf16", f"{op}/fp32"} <= used, op
    assert {"ln_modulate/plain/strided/bf16", "ln_modulate/affine/strided/fp32", "keep_gather/strided/bf16"} <= used
    for v in report["variants"]:
        assert 0 < v["registers"] <= 255 and v["spill_stores"] == 0 and v["spill_loads"] == 0, v
        ptrs = [t for t in v["signature"].values() if t.startswith("*")]
        assert ptrs, v  # pointer arguments were typed from the captured tensors
        assert v["shared_bytes"] <= 227 * 1024 and v["programs_per_sm"] >= 1, v
        warps = v["options"].get("num_warps", 4)
        assert v["warps_per_sm"] == v["programs_per_sm"] * warps and v["occupancy"] == v["warps_per_sm"] / 64, v
        assert v["limited_by"] in ("registers", "threads", "blocks", "shared_memory"), v
        assert [x["case"] for x in v["launches"]] == v["used_by"] and all(x["programs"] > 0 for x in v["launches"])
        if v["kernel"] in ("_adaln_fwd_kernel", "_adaln_bwd_kernel"):
            # D=1152 as 1024 + 128 columns (no 2048-wide padding), few enough registers for >= 4 programs per SM,
            # the row walk software-pipelined in bf16, not in fp32; the fused backward's staging buffers (cp.async)
            # in shared memory beside its 4 KB of reduction scratch
            assert (v["constexprs"]["BLOCK_A"], v["constexprs"]["BLOCK_T"]) == (1024, 128), v
            pipelined = "*bf16" in v["signature"].values()
            assert v["constexprs"]["NUM_STAGES"] == (2 if pipelined else 1) and v["programs_per_sm"] >= 4, v
            fused_bwd = v["kernel"] == "_adaln_bwd_kernel" and "gate_residual_ln_modulate/plain/bf16" in v["used_by"]
            assert not fused_bwd or v["shared_bytes"] > 4096, v
        if v["kernel"] == "_adaln_finalize_kernel":  # a grid of at least one program per SM, b32 included
            assert all(x["programs"] >= report["sm_count_assumed"] for x in v["launches"]), v
    return used


def test_every_production_kernel_compiles_for_sm90a_without_spills(tmp_path):
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "compile-sm90.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compile_gate.py"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_report(json.loads(out.read_text()), triton.__version__)


def test_committed_gate_results_of_the_pinned_and_the_gpu_images_triton():
    """One committed file per Triton, named by its version: the pinned one's and the GPU image's, each a passing
    report over the same variants' uses."""
    import triton

    files = {p.name: p for p in RESULTS.glob("compile-sm90-triton*.json")}
    wanted = {f"compile-sm90-triton{v}.json" for v in (triton.__version__, GPU_IMAGE_TRITON)}
    assert wanted <= set(files), sorted(files)
    uses = [check_report(json.loads(files[name].read_text()), name.removeprefix("compile-sm90-triton")
                         .removesuffix(".json")) for name in sorted(wanted)]
    assert all(u == uses[0] for u in uses)
