"""The Hopper compile gate: every Triton kernel variant the fused ops launch at production shapes compiles for
sm_90a without register spills (ptxas -v), checked on a CPU-only machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_every_production_kernel_compiles_for_sm90a_without_spills(tmp_path):
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "compile-sm90.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compile_gate.py"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["all_ok"] and report["target"].startswith("sm_90a")
    kernels = {v["kernel"] for v in report["variants"]}
    assert kernels == {"_move_rows_kernel", "_patch_norm_mse_kernel", "_adaln_fwd_kernel", "_adaln_bwd_kernel",
                       "_adaln_finalize_kernel"}
    used = {name for v in report["variants"] for name in v["used_by"]}
    for op in ("keep_gather", "unshuffle", "patch_norm_mse", "gate_residual", "ln_modulate/plain",
               "ln_modulate/affine", "gate_residual_ln_modulate/affine"):
        assert {f"{op}/bf16", f"{op}/fp32"} <= used, op
    for v in report["variants"]:
        assert 0 < v["registers"] <= 255 and v["spill_stores"] == 0 and v["spill_loads"] == 0, v
        ptrs = [t for t in v["signature"].values() if t.startswith("*")]
        assert ptrs, v  # pointer arguments were typed from the captured tensors
        assert v["shared_bytes"] <= 227 * 1024 and v["programs_per_sm"] >= 1, v
        if v["kernel"] in ("_adaln_fwd_kernel", "_adaln_bwd_kernel"):
            # D=1152 as 1024 + 128 columns (no 2048-wide padding), few enough registers for >= 4 programs per SM
            assert (v["constexprs"]["BLOCK_A"], v["constexprs"]["BLOCK_T"]) == (1024, 128), v
            assert v["programs_per_sm"] >= 4, v
    assert {"ln_modulate/plain/strided/bf16", "ln_modulate/affine/strided/fp32", "keep_gather/strided/bf16"} <= used
