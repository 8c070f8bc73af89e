"""Faults never lose work and never pass silently: non-finite losses, damaged checkpoints, killed runs."""
import json
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from usp_fast.artifacts import complete_checkpoints, read_metrics, verify_checkpoint
from usp_fast.engine import Trainer
from usp_fast.errors import CheckpointError, TrainingDiverged
from usp_fast.stages.pretrain import PretrainStage


def _cfg(tmp_path, built_cache, tiny_vae_dir, *extra):
    return make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={built_cache.data.cache_dir}",
                    "train.max_steps=8", *extra)


class NaNAt(PretrainStage):
    """The pretrain stage with a NaN loss on chosen micro-step calls (counted from 0)."""

    def __init__(self, cfg, bad_calls):
        super().__init__(cfg)
        self.bad_calls, self.calls = set(bad_calls), 0

    def loss(self, model, batch, generator):
        loss, metrics = super().loss(model, batch, generator)
        if self.calls in self.bad_calls:
            loss = loss * float("nan")
        self.calls += 1
        return loss, metrics


def test_diverged_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, built_cache, tiny_vae_dir):
    common = ["train.ckpt_every=2", "train.log_every=4", "run.name=d"]
    Trainer(c := _cfg(tmp_path, built_cache, tiny_vae_dir, *common, "train.run_steps=2"), PretrainStage(c)).train()
    good = complete_checkpoints(Path(c.run.out_dir) / "d" / "checkpoints")
    assert [s for s, _ in good] == [2]
    before = (good[0][1] / "COMPLETE").read_text()
    # micro-batch 2 of the resumed run (step 4, accumulation 2) goes NaN: caught before the step-4 checkpoint
    cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, *common)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss.* between steps 3 and 4.*step_00000002 is intact"):
        Trainer(cfg, NaNAt(cfg, {2}), resume="auto").train()
    rdir = Path(cfg.run.out_dir) / "d"
    assert [s for s, _ in complete_checkpoints(rdir / "checkpoints")] == [2]  # nothing non-finite was saved
    assert (good[0][1] / "COMPLETE").read_text() == before and verify_checkpoint(good[0][1])
    assert not (rdir / "export").exists()


def test_huge_lr_diverges_and_no_export_is_written(tmp_path, built_cache, tiny_vae_dir):
    cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, "optim.lr=1e30", "optim.warmup_epochs=0", "train.log_every=2")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        Trainer(cfg, PretrainStage(cfg)).train()
    rdir = Path(cfg.run.out_dir) / cfg.run.name
    assert complete_checkpoints(rdir / "checkpoints") == [] and not (rdir / "export").exists()


def test_skip_mode_counts_bad_micro_batches_and_finishes_finite(tmp_path, built_cache, tiny_vae_dir):
    cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, "train.nonfinite=skip", "train.log_every=4")
    result = Trainer(cfg, NaNAt(cfg, {3, 5})).train()
    rows = read_metrics(Path(cfg.run.out_dir) / cfg.run.name)
    assert [r["nonfinite_skipped"] for r in rows] == [2, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    assert Path(result["export"]).is_dir()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_auto_skips_a_damaged_checkpoint_and_stays_exact(tmp_path, built_cache, tiny_vae_dir, damage, caplog):
    common = ["train.ckpt_every=2", "train.keep_last=3"]
    full = _cfg(tmp_path, built_cache, tiny_vae_dir, *common, "run.name=full")
    Trainer(full, PretrainStage(full)).train()
    part = _cfg(tmp_path, built_cache, tiny_vae_dir, *common, "run.name=part", "train.run_steps=4")
    Trainer(part, PretrainStage(part)).train()
    ckpts = complete_checkpoints(Path(part.run.out_dir) / "part" / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 4]
    victim = ckpts[-1][1] / "mp_rank_00_model_states.pt"
    _truncate(victim) if damage == "truncate" else victim.unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        verify_checkpoint(ckpts[-1][1])
    resumed = _cfg(tmp_path, built_cache, tiny_vae_dir, *common, "run.name=part")
    with caplog.at_level("WARNING"):
        trainer = Trainer(resumed, PretrainStage(resumed), resume="auto")
    assert trainer.start_step == 2 and "step_00000004" in caplog.text and "falling back" in caplog.text
    trainer.train()
    losses = lambda c: [(r["step"], r["loss"]) for r in read_metrics(Path(c.run.out_dir) / c.run.name)]  # noqa: E731
    assert losses(resumed) == losses(full)  # exact, and no step recorded twice


def test_a_named_damaged_checkpoint_is_an_error(tmp_path, built_cache, tiny_vae_dir):
    cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, "train.max_steps=2")
    Trainer(cfg, PretrainStage(cfg)).train()
    (ckpt,) = [p for _, p in complete_checkpoints(Path(cfg.run.out_dir) / cfg.run.name / "checkpoints")]
    marker = json.loads((ckpt / "COMPLETE").read_text())
    assert marker["step"] == 2 and all(len(f["sha256"]) == 64 for f in marker["files"].values())
    _truncate(ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="bytes"):
        Trainer(cfg, PretrainStage(cfg), resume=str(ckpt))


def test_metrics_never_hold_a_step_twice_after_a_kill_before_the_first_checkpoint(tmp_path, built_cache,
                                                                                   tiny_vae_dir):
    cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, "train.max_steps=4", "train.log_every=1")
    Trainer(cfg, PretrainStage(cfg)).train()
    rdir = Path(cfg.run.out_dir) / cfg.run.name
    import shutil
    shutil.rmtree(rdir / "checkpoints")  # as if killed after logging, before any checkpoint was complete
    with open(rdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # and mid-write
    Trainer(cfg, PretrainStage(cfg), resume="auto").train()
    assert [r["step"] for r in read_metrics(rdir)] == [1, 2, 3, 4]


def test_every_run_plots_its_loss_and_lr_at_checkpoints_and_the_end(tmp_path, built_cache, tiny_vae_dir):
    import numpy as np
    from PIL import Image

    cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, "train.max_steps=4", "train.ckpt_every=2", "train.run_steps=2")
    Trainer(cfg, PretrainStage(cfg)).train()  # stops at the checkpoint of step 2
    png = Path(cfg.run.out_dir) / cfg.run.name / "loss.png"
    first = np.asarray(Image.open(png).convert("RGB"))
    assert first.shape[1] > first.shape[0] >= 200 and first.std() > 5  # two panels side by side, not blank
    cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, "train.max_steps=4", "train.ckpt_every=2")
    Trainer(cfg, PretrainStage(cfg), resume="auto").train()
    assert not np.array_equal(np.asarray(Image.open(png).convert("RGB")), first)  # redrawn with steps 3-4


def test_bf16_accumulates_gradients_in_fp32_or_is_refused(tmp_path, built_cache, tiny_vae_dir):
    from usp_fast.engine import deepspeed_config
    from usp_fast.errors import ConfigError

    def config(zero, micro=4):
        cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, f"train.zero_stage={zero}", f"train.micro_batch={micro}")
        return deepspeed_config(cfg, 1, torch.bfloat16)

    for zero in (1, 2, 3):
        assert config(zero)["data_types"] == {"grad_accum_dtype": "fp32"}
    with pytest.raises(ConfigError, match="zero_stage >= 1"):
        config(0)  # 2 bf16 accumulation micro-steps with no fp32 buffer
    assert "data_types" not in config(0, micro=8)  # no accumulation: nothing to accumulate
    cfg = _cfg(tmp_path, built_cache, tiny_vae_dir, "train.zero_stage=1")
    assert "data_types" not in deepspeed_config(cfg, 1, torch.float32)


def test_optim_impl_apex_is_optional_and_refused_clearly(monkeypatch):
    """optim.impl=apex uses apex's FusedAdam in AdamW mode when apex is importable, and otherwise fails with a
    one-line error naming the key (apex is not on PyPI); auto and torch give torch's AdamW."""
    import sys
    import types

    from usp_fast.config import ConfigError
    from usp_fast.stages.base import apex_adamw

    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.05}]
    monkeypatch.setitem(sys.modules, "apex", None)  # not installed
    with pytest.raises(ConfigError, match="optim.impl=apex: NVIDIA apex is not installed"):
        apex_adamw(groups, 1e-3, (0.9, 0.95), on_cuda=True)

    made = {}

    class FusedAdam:  # the constructor apex documents: FusedAdam(params, lr, betas, adam_w_mode, ...)
        def __init__(self, params, lr, betas, adam_w_mode):
            made.update(params=params, lr=lr, betas=betas, adam_w_mode=adam_w_mode)

    apex = types.ModuleType("apex")
    apex.optimizers = types.SimpleNamespace(FusedAdam=FusedAdam)
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    assert isinstance(apex_adamw(groups, 1e-3, (0.9, 0.95), on_cuda=True), FusedAdam)
    assert made == {"params": groups, "lr": 1e-3, "betas": (0.9, 0.95), "adam_w_mode": True}
    with pytest.raises(ConfigError, match="runs on CUDA only"):
        apex_adamw(groups, 1e-3, (0.9, 0.95), on_cuda=False)
