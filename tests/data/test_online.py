"""data.source=online: decode + crop + VAE-encode during training, with exact resume."""
import json
from pathlib import Path

import torch

from conftest import make_cfg
from usp_fast.data.online import OnlineSource
from usp_fast.data.stream import StreamPlan
from usp_fast.engine import Trainer
from usp_fast.stages.pretrain import PretrainStage
from usp_fast.vae import load_vae


def _losses(cfg):
    rows = (Path(cfg.run.out_dir) / cfg.run.name / "metrics.jsonl").read_text().splitlines()
    return [(json.loads(r)["step"], json.loads(r)["loss"]) for r in rows]


def _online(tmp_path, images, vae_dir, *extra):
    return make_cfg(tmp_path, images, vae_dir, "data.source=online", "data.decoder=pil", "data.prefetch=2",
                    f"data.cache_dir={tmp_path / 'no-cache'}", *extra)


def test_online_resume_is_exact_and_needs_no_cache(tmp_path, demo_images, tiny_vae_dir):
    common = ["train.max_steps=5", "train.ckpt_every=3"]
    full = _online(tmp_path, demo_images, tiny_vae_dir, *common, "run.name=full")
    Trainer(full, PretrainStage(full)).train()
    part = _online(tmp_path, demo_images, tiny_vae_dir, *common, "run.name=part", "train.run_steps=3")
    assert Trainer(part, PretrainStage(part)).train() == {"stopped_at": 3}
    resumed = _online(tmp_path, demo_images, tiny_vae_dir, *common, "run.name=part")
    Trainer(resumed, PretrainStage(resumed), resume="auto").train()
    assert _losses(resumed) == _losses(full)  # bitwise-equal: crops, flips and noise all follow (seed, step)
    assert [s for s, _ in _losses(full)] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "no-cache").exists()


def test_online_batches_match_a_direct_encode_and_cover_each_file_once_per_epoch(tmp_path, demo_images,
                                                                                 tiny_vae_dir):
    cfg = _online(tmp_path, demo_images, tiny_vae_dir, "train.micro_batch=4", "train.global_batch=8")
    vae = load_vae(str(tiny_vae_dir))
    src = OnlineSource(cfg, vae, "cpu")
    n = len(src)
    plans = [StreamPlan(n, 0, 8, 4, 2, r) for r in (0, 1)]
    streams = [iter(src.stream(p, 0, n // 8 * 2)) for p in plans]  # two epochs, two ranks
    seen = []
    for _ in range(n // 8 * 2):
        for s in streams:
            batch = next(s)
            assert batch["mean"].shape == (4, 4, 8, 8) and batch["labels"].dtype == torch.int64
            seen += batch["indices"].tolist()
    for e in range(2):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
    # the stream's latents are the VAE's encoding of the crops the plan names
    idx, flips, _, epochs = plans[0].micro_batch(0, 0)
    x, used, labels = src.images(idx, flips, epochs)
    first = next(iter(src.stream(plans[0], 0, 1)))
    assert torch.equal(first["indices"], used) and torch.allclose(first["mean"], vae.encode(x)[0])
    assert labels.tolist() == [src.items[i][1] for i in idx]
