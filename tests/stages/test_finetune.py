"""--stage finetune on the online path: the tiny VAE, demo photo crops (11 classes), a random usp_vit_test export."""
import json
from pathlib import Path

import pytest
import torch

from conftest import RESOLUTION, make_cfg
from usp_fast.engine import Trainer
from usp_fast.artifacts import save_encoder
from usp_fast.stages.finetune import FinetuneStage, load_cache_latents, top_k
from usp_fast.models.usp_vit import build_model
from usp_fast.vae import load_vae
from usp_fast.vae import LatentNorm


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_vae_dir):
    torch.manual_seed(0)
    model = build_model("usp_vit_test", in_chans=4, input_size=RESOLUTION // 8)
    return save_encoder(model, tmp_path_factory.mktemp("ft_export") / "export", "usp_vit_test",
                        load_vae(str(tiny_vae_dir)).identity, RESOLUTION, 0, 0.0)


RANDAUG = "rand-m9-mstd0.5-inc1"


def _cfg(tmp_path, images, vae_dir, export, *extra):
    # vae.scale: the tiny random VAE's latents have std ~0.03 at SD's 0.18215; ~6 brings them to unit scale
    return make_cfg(tmp_path, images, vae_dir, "vae.scale=6.0", "data.source=online", "data.decoder=pil",
                    "data.crop=rrc", f"data.cache_dir={tmp_path / 'no-cache'}",
                    f"finetune.encoder={export}", "optim.betas=[0.9,0.999]", "optim.weight_decay=0.05",
                    *extra, stage="finetune")


def _rows(cfg):
    path = Path(cfg.run.out_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines()]


def test_finetune_raises_accuracy_and_saves_classifier(tmp_path, demo_images, tiny_vae_dir, export, one_thread):
    from safetensors.torch import load_file

    from usp_fast.data.cache import build_cache

    val = tmp_path / "val_cache"  # centre crops of the training images: a training-set top-1
    val_cfg = make_cfg(tmp_path, demo_images, tiny_vae_dir, "vae.scale=6.0", f"data.cache_dir={val}")
    build_cache(val_cfg, load_vae(str(tiny_vae_dir), 6.0), torch.device("cpu"))
    cfg = _cfg(tmp_path, demo_images, tiny_vae_dir, export, "finetune.mixup=0", "finetune.cutmix=0",
               "finetune.label_smoothing=0", f"finetune.val_cache_dir={val}", "data.crop=center",
               "data.sample_posterior=false",  # the random VAE's posterior std is noise at latent scale
               "optim.lr=2e-3", "optim.warmup_epochs=5", "train.epochs=60", "train.global_batch=40",
               "train.micro_batch=20", "train.log_every=10")
    trainer = Trainer(cfg, FinetuneStage(cfg))
    latents, labels = load_cache_latents(val, cfg)
    before = top_k(trainer.engine.module, latents, labels)["top1"]
    result = trainer.train()
    assert result["top1"] >= before + 30 and result["top1"] >= 50, (before, result)  # percent
    losses = [r["loss"] for r in _rows(cfg)]
    assert losses[-1] < 0.8 * losses[0], losses
    saved = load_file(result["classifier"])
    assert set(saved) == set(trainer.engine.module.state_dict())
    assert torch.equal(saved["head.weight"], trainer.engine.module.head.weight.detach().float())
    report = json.loads((Path(cfg.run.out_dir) / cfg.run.name / "finetune.json").read_text())
    assert report["top1"] == result["top1"] and report["num_images"] == len(labels)


def test_layer_decay_groups_get_scaled_lr(tmp_path, demo_images, tiny_vae_dir, export, one_thread):
    cfg = _cfg(tmp_path, demo_images, tiny_vae_dir, export, "finetune.layer_decay=0.5", "optim.lr=1e-3",
               "optim.warmup_epochs=0", "optim.schedule=constant", "train.max_steps=1")
    trainer = Trainer(cfg, FinetuneStage(cfg))
    model = trainer.engine.module
    trainer.train()
    # usp_vit_test has 2 blocks: layer ids 0 (embeddings), 1..2 (blocks), 3 (fc_norm, head) -> scale 0.5^(3 - id)
    by_param = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    expect = {"patch_embed.proj.weight": 0.125, "pos_embed": 0.125, "blocks.0.attn.qkv.weight": 0.25,
              "blocks.1.mlp.fc2.bias": 0.5, "head.weight": 1.0, "fc_norm.weight": 1.0}
    params = dict(model.named_parameters())
    for name, scale in expect.items():
        group = by_param[id(params[name])]
        assert group["lr_scale"] == pytest.approx(scale), name
        assert group["lr"] == pytest.approx(1e-3 * scale), name
        assert group["weight_decay"] == (0.0 if params[name].ndim <= 1 or name == "pos_embed" else 0.05), name


def test_finetune_resume_is_exact_with_mixup_and_randaug(tmp_path, demo_images, tiny_vae_dir, export, one_thread):
    common = ["train.max_steps=4", "train.ckpt_every=2", "finetune.mixup=0.8", "finetune.cutmix=1.0",
              f"data.randaug={RANDAUG}"]
    full = _cfg(tmp_path, demo_images, tiny_vae_dir, export, *common, "run.name=full")
    Trainer(full, FinetuneStage(full)).train()
    part = _cfg(tmp_path, demo_images, tiny_vae_dir, export, *common, "run.name=part", "train.run_steps=2")
    assert Trainer(part, FinetuneStage(part)).train() == {"stopped_at": 2}
    resumed = _cfg(tmp_path, demo_images, tiny_vae_dir, export, *common, "run.name=part")
    Trainer(resumed, FinetuneStage(resumed), resume="auto").train()
    assert [(r["step"], r["loss"]) for r in _rows(resumed)] == [(r["step"], r["loss"]) for r in _rows(full)]
    assert len(_rows(full)) == 4


def test_randaug_changes_pixels_deterministically_and_forces_pil(tmp_path, demo_images, tiny_vae_dir, export):
    from usp_fast.data.online import OnlineSource

    vae = load_vae(str(tiny_vae_dir), 6.0)
    plain = OnlineSource(_cfg(tmp_path, demo_images, tiny_vae_dir, export), vae, "cpu")
    aug_cfg = _cfg(tmp_path, demo_images, tiny_vae_dir, export, f"data.randaug={RANDAUG}", "data.decoder=auto")
    aug = OnlineSource(aug_cfg, vae, "cpu")
    assert aug.decoder.name == "pil"
    idx, flips, epochs = [0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 1, 1]
    x0, _, _ = plain.images(idx, flips, epochs)
    x1, _, _ = aug.images(idx, flips, epochs)
    x2, _, _ = aug.images(idx, flips, epochs)
    assert torch.equal(x1, x2)  # a pure function of (seed, epoch, index): resume sees the same pixels
    assert x1.shape == x0.shape and (x1 - x0).abs().mean() > 0.01
    x3, _, _ = aug.images(idx, flips, [5, 5, 5, 5])  # another epoch: other crops and other augmentations
    assert not torch.equal(x3, x1)


def test_mixup_is_a_function_of_the_step_seed(tmp_path, demo_images, tiny_vae_dir, export):
    cfg = _cfg(tmp_path, demo_images, tiny_vae_dir, export)  # mixup 0.8, cutmix 1.0, smoothing 0.1
    task = FinetuneStage(cfg)
    task.build_model({"num_classes": 11, "latent_size": RESOLUTION // 8, "vae": None}, LatentNorm())
    x, y = torch.randn(8, 4, 8, 8), torch.arange(8)
    mixed = [task._mix(x.clone(), y, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(mixed[0][0], mixed[1][0]) and torch.equal(mixed[0][1], mixed[1][1])
    assert not torch.equal(mixed[0][0], mixed[2][0])
    xm, target = mixed[0]
    assert not torch.equal(xm, x) and target.shape == (8, 11)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    assert target.max() < 1.0  # soft: label smoothing and the partner image's share
