"""Where a benchmark ran: the device, the code (git commit) and the library versions, as every results file records
them; the datasheet figures of known GPUs; and the Triton interpreter switch of CPU runs. Every benchmark module
takes these from here."""
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Datasheet dense bf16 tensor-core peaks (TFLOP/s), by torch.cuda.get_device_name: what the steps suite's `mfu`
# divides by (its `mfu_vs_measured_matmul` divides by the matmul rate measured in the same run).
DATASHEET_BF16_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4,
                         "NVIDIA H20": 148.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0}
# Datasheet HBM bandwidth (TB/s), recorded beside the measured copy bandwidth that the kernels' fractions use.
DATASHEET_HBM_TBPS = {"NVIDIA H100 80GB HBM3": 3.35, "NVIDIA H100 PCIe": 2.0, "NVIDIA H200": 4.8, "NVIDIA H20": 4.0,
                      "NVIDIA A100-SXM4-80GB": 2.039, "NVIDIA A100-SXM4-40GB": 1.555}


def use_triton_interpreter_without_cuda():
    """Without CUDA, run the Triton kernels on CPU tensors through the interpreter (a smoke test of the benchmark
    code, not performance data). Must precede the first kernel launch: usp_fast_kernels imports triton there."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def device_name(device):
    """'NVIDIA H100 80GB HBM3' on CUDA, 'cpu-x86_64' on CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine() or 'unknown'}"


def slug(name):
    """A device name as a file name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit():
    """{'commit': HEAD of this checkout, 'dirty': tracked files changed}. Outside a git checkout (a copy carried to a
    GPU machine has no .git) the commit is USP_FAST_COMMIT, which benchmarks/gpu_check.sh sets from COMMIT= or
    commit.txt, with dirty None (unknown); both None without it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": os.environ.get("USP_FAST_COMMIT") or None, "dirty": None}


def utc_now():
    """The current UTC time, ISO 8601 to the second: the `date` of a results file."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment(device):
    """What a results file records about its run: device, date, commit, library versions."""
    import triton

    return {
        "device": device_name(device),
        "date": utc_now(),
        **git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
