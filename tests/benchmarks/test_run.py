"""Smoke test of the benchmark CLI: the kernels suite on CPU (Triton interpreter, tiny shapes) writes a complete
results file."""
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNEL_OPS = {"keep_gather", "unshuffle", "patch_norm_mse", "ln_modulate", "gate_residual",
              "gate_residual_ln_modulate"}


def test_kernels_suite_on_cpu_writes_every_op(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}  # the CPU path even on a GPU box
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--suite", "kernels",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU figures are absent" in proc.stdout

    chart = next(tmp_path.glob("cpu*-kernels.png"))  # the chart beside the results, listed in the README
    from PIL import Image
    import numpy as np

    img = np.asarray(Image.open(chart).convert("RGB"))
    assert img.shape[0] >= 250 and img.shape[1] >= 450 and img.std() > 5
    assert f"![{chart.stem}]({chart.name})" in (tmp_path / "README.md").read_text()

    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("cpu")
    record = json.loads(files[0].read_text())
    result = record["suites"]["kernels"]
    for meta in (record, result):
        assert meta["device"].startswith("cpu")
        assert "commit" in meta and (meta["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["commit"]))
        assert datetime.datetime.fromisoformat(meta["date"]).year >= 2024
        assert meta["torch"] and meta["triton"] and meta["python"]

    assert set(result["ops"]) == KERNEL_OPS
    for op, entry in result["ops"].items():
        assert {"triton", "eager"} <= set(entry["impls"]), op
        for impl, row in entry["impls"].items():
            assert all(row[k] > 0 for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")), (op, impl)
        assert entry["max_rel_error_vs_eager"] < 1e-5, op
        assert entry["targets"], op
        assert entry["targets_met"] is None and "speedup" not in entry  # no timing claims without a GPU
    for op in ("keep_gather", "unshuffle"):
        assert "mae_gather" in result["ops"][op]["impls"]
    assert result["copy_bandwidth_gbps"] is None


def test_gpu_speed_targets_come_from_targets_yaml():
    """The GPU branch's verdicts (no GPU measures them here): each op's targets are targets.yaml's `_kernels`,
    speed-ups judged fwd+bwd against the implementation each target names, bandwidth against the datasheet HBM
    rate (the op's roofline)."""
    from usp_fast_benchmarks import kernel_suite

    entry = {"targets": kernel_suite.kernel_speed_targets("keep_gather"),
             "impls": {"triton": {"hbm_bw_fraction_fwd_bwd": 0.65}},
             "speedup": {"vs_mae_gather": {"fwd_bwd": 3.5}, "vs_eager": {"fwd_bwd": 1.1},
                         "vs_compile": {"fwd_bwd": 1.0}}}
    assert entry["targets"] == {"hbm_bw_fraction": 0.7, "vs_mae_gather": 3.0, "vs_adv_index": 1.2, "vs_compile": 1.0}
    assert kernel_suite.targets_met(entry) == {
        "vs_mae_gather": {"wanted": 3.0, "got": 3.5, "met": True},
        "vs_adv_index": {"wanted": 1.2, "got": 1.1, "met": False},  # the eager reference is the advanced indexing
        "hbm_bw_fraction": {"wanted": 0.7, "got": 0.65, "met": False},
        "vs_compile": {"wanted": 1.0, "got": 1.0, "met": True}}
