"""Every launcher gives one world (usp_fast/dist.py), and a run resumes on another number of ranks (universal
checkpoints, usp_fast/engine.py) at the same step with the same samples per step."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from usp_fast.artifacts import read_metrics
from usp_fast.cli import _take_local_rank
from usp_fast.dist import LaunchError, first_host, world_from_launcher
from usp_fast.engine import Trainer
from usp_fast.stages import load_config
from usp_fast.stages.pretrain import PretrainStage

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain" / "demo.yaml"

# what srun sets in each task (a subset), for a 2-task step on nodes gpu[07-08]
SRUN = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}


def test_the_world_each_launcher_describes():
    assert world_from_launcher(SRUN) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                         "MASTER_PORT": str(20000 + 4242)}
    assert world_from_launcher({**SRUN, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert world_from_launcher({**SRUN, **torchrun}) == {}  # torchrun/deepspeed inside an srun step: theirs wins
    batch_script = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"}
    assert world_from_launcher(batch_script)["WORLD_SIZE"] == "1"  # the batch script itself is one process
    mpi = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert world_from_launcher({**mpi, "MASTER_ADDR": "h"})["RANK"] == "1"
    with pytest.raises(LaunchError, match="2 MPI processes but no MASTER_ADDR"):
        world_from_launcher(mpi)
    with pytest.raises(LaunchError, match="no SLURM_JOB_NODELIST"):
        world_from_launcher({k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"})
    assert world_from_launcher({})["WORLD_SIZE"] == "1"


@pytest.mark.parametrize("nodes, first", [("gpu[07-09,12],cpu1", "gpu07"), ("a,b", "a"), ("node5", "node5"),
                                          ("n[3]", "n3"), ("x[010-020]", "x010")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert first_host(nodes) == first


def test_the_deepspeed_launchers_local_rank_argument_is_taken_anywhere(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _take_local_rank(["--local_rank=1", "train", "--stage", "x"]) == ["train", "--stage", "x"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _take_local_rank(["train", "--local_rank", "1", "a=b"]) == ["train", "a=b"]


def _args(tmp_path, built_cache, tiny_vae_dir, *extra):
    return [f"run.out_dir={tmp_path / 'runs'}", "run.name=w", f"data.root={built_cache.data.root}",
            f"data.cache_dir={built_cache.data.cache_dir}", "data.resolution=64", "data.num_workers=0",
            "data.demo_images=0", f"vae.name={tiny_vae_dir}", "vae.scale=0.18215", "vae.normalize=none",
            "model.name=usp_vit_test", "train.global_batch=8", "train.micro_batch=2", "train.max_steps=4",
            "train.log_every=1", "train.ckpt_every=2", "train.audit_samples=true", "train.zero_stage=1", *extra]


def _samples_per_step(run):
    """{step: sorted sample indices of that step over every rank and micro-step} from the per-rank audits."""
    out = {}
    for f in run.glob("samples_r*.txt"):
        for line in f.read_text().splitlines():
            step, *idx = map(int, line.split())
            out.setdefault(step, []).extend(idx)
    return {s: sorted(v) for s, v in out.items()}


def _reference(tmp_path, built_cache, tiny_vae_dir):
    """The samples of an uninterrupted one-rank run of the same config."""
    cfg = load_config(CONFIG, _args(tmp_path / "ref", built_cache, tiny_vae_dir))
    Trainer(cfg, PretrainStage(cfg)).train()
    return _samples_per_step(tmp_path / "ref" / "runs" / "w")


def _launch(cmd, tmp_path, env=None):
    # not this process's own world (an earlier in-process run set RANK, WORLD_SIZE, MASTER_PORT ...)
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path,  # any directory
                          env={**inherited, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _fake_srun(tmp_path):
    """An `srun` that starts SLURM_NTASKS local tasks with srun's per-task environment (no scheduler)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text("""#!/bin/bash
while [[ "$1" == --* ]]; do shift; done  # srun's own options
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS "$@" & pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
""")
    (bindir / "srun").chmod(0o755)
    return bindir


def test_the_sbatch_example_gives_one_world_and_resumes_on_one_rank(tmp_path, built_cache, tiny_vae_dir):
    """examples/slurm/pretrain.sbatch through a fake srun with 2 tasks: one 2-rank world (every sample once per
    step, one metrics row per step); stopped at step 2, it continues on 1 rank from step 2 with the same samples
    per step as an uninterrupted run (a universal checkpoint of the 2 partitions)."""
    env = {"PATH": f"{_fake_srun(tmp_path)}:{os.environ['PATH']}", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(random.randint(1, 19999)),
           "CONFIG": str(CONFIG), "PYTHON": sys.executable}
    args = _args(tmp_path, built_cache, tiny_vae_dir, "train.run_steps=2")
    _launch(["bash", str(REPO / "examples" / "slurm" / "pretrain.sbatch"), *args], tmp_path, env)
    run = tmp_path / "runs" / "w"
    assert "2 ranks" in (run / "train.log").read_text()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert sorted(p.name for p in run.glob("samples_r*.txt")) == ["samples_r0.txt", "samples_r1.txt"]
    cfg = load_config(CONFIG, _args(tmp_path, built_cache, tiny_vae_dir))
    trainer = Trainer(cfg, PretrainStage(cfg), resume="auto")
    assert trainer.start_step == 2 and trainer.world == 1
    trainer.train()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert _samples_per_step(run) == _reference(tmp_path, built_cache, tiny_vae_dir)
    assert not (run / "checkpoints" / ".universal").exists()  # the converted copy goes with the next save


def test_torchrun_continues_a_one_rank_run_on_two(tmp_path, built_cache, tiny_vae_dir):
    args = _args(tmp_path, built_cache, tiny_vae_dir)
    cfg = load_config(CONFIG, [*args, "train.run_steps=2"])
    Trainer(cfg, PretrainStage(cfg)).train()
    port = str(random.randint(30000, 39999))
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
             "-m", "usp_fast", "train", "--stage", "pretrain", "--config", str(CONFIG), "--resume", "auto", *args],
            tmp_path)
    run = tmp_path / "runs" / "w"
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "step_00000002 at step 2" in log and "2 ranks" in log
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert _samples_per_step(run) == _reference(tmp_path, built_cache, tiny_vae_dir)
