import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from usp_fast.data.cache import CacheError
from usp_fast.artifacts import ExportError, complete_checkpoints, load_encoder
from usp_fast.engine import Trainer
from usp_fast.optim import lr_at
from usp_fast.stages.pretrain import PretrainStage

REPO = Path(__file__).resolve().parents[2]


def _losses(cfg):
    rows = [json.loads(r) for r in (Path(cfg.run.out_dir) / cfg.run.name / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _train(cfg, resume=None):
    return Trainer(cfg, PretrainStage(cfg), resume=resume).train()


def test_tiny_run_loss_falls_and_exports(tmp_path, built_cache, tiny_vae_dir):
    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={built_cache.data.cache_dir}",
                   "train.max_steps=60", "optim.lr=2e-3", "train.log_every=5", "data.sample_posterior=false")
    result = _train(cfg)
    losses = [l for _, l in _losses(cfg)]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:2]) / 2, losses
    tensors, meta = load_encoder(result["export"])
    assert meta["model"] == "usp_vit_test" and meta["step"] == 60 and meta["config"]["grid_size"] == 4
    assert meta["vae"]["name"] == str(tiny_vae_dir)
    assert not any(k.startswith(("decoder", "mask_token")) for k in tensors)
    ckpt = torch.load(next((Path(cfg.run.out_dir) / "t" / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")),
                      weights_only=False)
    for k, v in tensors.items():  # export holds exactly the trained encoder weights
        assert torch.equal(v, ckpt["module"][k].float()), k


def test_resume_is_exact(tmp_path, built_cache, tiny_vae_dir):
    common = [f"data.cache_dir={built_cache.data.cache_dir}", "train.max_steps=8", "train.ckpt_every=3",
              "train.keep_last=2"]
    full = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, *common, "run.name=full")
    _train(full)
    part = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, *common, "run.name=part", "train.run_steps=5")
    assert _train(part) == {"stopped_at": 5}
    ckpts = [s for s, _ in complete_checkpoints(Path(part.run.out_dir) / "part" / "checkpoints")]
    assert ckpts == [3, 5]  # keep_last=2
    # a crash after a checkpoint left metric rows past it; they are replaced on resume
    resumed = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, *common, "run.name=part")
    _train(resumed, resume="auto")
    assert _losses(resumed) == _losses(full)  # bitwise-equal per-step losses (fp32 CPU)
    assert [s for s, _ in _losses(full)] == list(range(1, 9))


def test_training_refuses_missing_or_mismatched_cache(tmp_path, built_cache, tiny_vae_dir):
    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={tmp_path / 'none'}")
    with pytest.raises(CacheError, match="--stage cache"):
        Trainer(cfg, PretrainStage(cfg))
    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={built_cache.data.cache_dir}",
                   "vae.name=some/other-vae")
    with pytest.raises(CacheError, match="vae.name"):
        Trainer(cfg, PretrainStage(cfg))


def test_lr_schedule_warmup_then_half_cosine():
    from usp_fast.stages import load_config
    cfg = load_config(None, ["optim.warmup_epochs=2", "optim.min_lr=0.1"])
    spe, total, base = 10.0, 100, 1.0
    assert lr_at(0, cfg, spe, total, base) == 0.0
    assert lr_at(10, cfg, spe, total, base) == pytest.approx(0.5)
    assert lr_at(20, cfg, spe, total, base) == pytest.approx(1.0)
    assert lr_at(60, cfg, spe, total, base) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(100, cfg, spe, total, base) == pytest.approx(0.1)


def test_lr_schedule_warmup_steps_overrides_warmup_epochs():
    from usp_fast.stages import load_config
    cfg = load_config(None, ["optim.warmup_epochs=2", "optim.warmup_steps=5", "optim.min_lr=0.1"])
    spe, total, base = 10.0, 105, 1.0
    assert lr_at(0, cfg, spe, total, base) == 0.0
    assert lr_at(4, cfg, spe, total, base) == pytest.approx(0.8)
    assert lr_at(5, cfg, spe, total, base) == pytest.approx(1.0)
    assert lr_at(55, cfg, spe, total, base) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(105, cfg, spe, total, base) == pytest.approx(0.1)


def test_two_process_deepspeed_sees_each_sample_once_per_epoch(tmp_path, built_cache, tiny_vae_dir):
    """`deepspeed --num_gpus 2 --module usp_fast` on CPU (gloo): one world, whose ranks train on disjoint halves
    of each epoch."""
    n = 40
    args = [f"run.out_dir={tmp_path / 'runs'}", "run.name=ddp", "data.demo_images=0", f"data.root={built_cache.data.root}",
            f"data.cache_dir={built_cache.data.cache_dir}", "data.resolution=64", "data.num_workers=0",
            f"vae.name={tiny_vae_dir}", "vae.scale=0.18215", "vae.normalize=none", "model.name=usp_vit_test", "train.global_batch=8", "train.micro_batch=2",
            "train.max_steps=10", "train.log_every=5", "train.audit_samples=true", "train.zero_stage=2"]
    # `deepspeed --module usp_fast train ...`: from any directory (cwd is the test's folder), --local_rank taken
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29533",
           "--module", "usp_fast", "train", "--stage", "pretrain", "--config",
           str(REPO / "configs" / "pretrain" / "demo.yaml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    per_rank = []
    for r in (0, 1):
        rows = [line.split() for line in (run / f"samples_r{r}.txt").read_text().splitlines()]
        per_rank.append([int(i) for row in rows for i in row[1:]])
    assert len(per_rank[0]) == len(per_rank[1]) == 40  # 10 steps x 4 micro-batches... x 2 samples / rank
    # interleave in stream order: step, micro-step, rank
    stream = []
    for k in range(0, 40, 2):
        stream += per_rank[0][k:k + 2] + per_rank[1][k:k + 2]
    for e in range(2):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert (run / "export" / "encoder.safetensors").exists()


def test_zero3_trains_and_exports_full_weights(tmp_path, built_cache, tiny_vae_dir):
    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={built_cache.data.cache_dir}",
                   "train.max_steps=2", "train.zero_stage=3", "run.name=z3")
    tensors, meta = load_encoder(_train(cfg)["export"])
    assert tensors["blocks.0.attn.qkv.weight"].shape == (96, 32)  # gathered, not a ZeRO-3 partition
    assert tensors["patch_embed.proj.weight"].abs().sum() > 0


def test_load_encoder_names_a_missing_export(tmp_path):
    with pytest.raises(ExportError, match=f"{tmp_path / 'nope'} does not exist"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "encoder.json").write_text("{}")
    with pytest.raises(ExportError, match="encoder.safetensors is missing"):
        load_encoder(tmp_path / "half")
