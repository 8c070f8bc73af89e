"""The paper configs and defaults follow the official recipe (AMAP-ML/USP pretrain/ and generation/, MAE, DiT, SiT).

Each test is written from a documented fact of the official code (flags, tables, formulas), not from its code:
  pretrain   main_pretrain.py: RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3) + RandomHorizontalFlip,
             encoded through the VAE every step (no --use_cached), latent_dist.mean, DataLoader(drop_last=True),
             timm param_groups_weight_decay with its defaults, AdamW(0.9, 0.95), fp16 autocast + GradScaler
  models     MAE: xavier patch-conv weight, default conv bias; 2-D sin-cos table (first half: column)
  DiT/SiT    DiT_VAE_simple keeps tanh-GELU; SiT's transport: t = 1 data, velocity x1 - x0
(SiT's sampler step counts and dopri5 are tested in tests/diffusion/test_diffusion.py.)
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from usp_fast.stages import load_config
from usp_fast.data.images import View, apply_view
from usp_fast.data.stream import StreamPlan
from usp_fast.models.layers import sincos_pos_embed_2d
from usp_fast.models.usp_vit import build_model
from usp_fast.optim import decay_groups, warmup_length

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRETRAIN = sorted((CONFIGS / "pretrain").glob("vit_*.yaml"))
GENERATE = sorted((CONFIGS / "generate").glob("[ds]it_*.yaml"))
IMAGENET_TRAIN = 1_281_167


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.stem)
def test_paper_pretrain_configs_encode_a_fresh_random_crop_every_step(path):
    cfg = load_config(path, stage="pretrain")
    d = cfg.data
    assert (d.source, d.crop, tuple(d.crop_scale), d.flip) == ("online", "rrc", (0.2, 1.0), True)
    assert d.sample_posterior is False  # the posterior mean
    assert cfg.data.resolution == 224 and cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix
    o = cfg.optim
    assert (o.blr, o.weight_decay, tuple(o.betas), o.warmup_epochs, o.schedule) == (1.5e-4, 0.05, (0.9, 0.95), 40,
                                                                                 "cosine")
    assert cfg.train.global_batch == 4096 and cfg.train.drop_last and cfg.train.epochs == 800


@pytest.mark.parametrize("path", GENERATE, ids=lambda p: p.stem)
def test_paper_generate_configs_start_from_1600_epoch_encoders(path):
    cfg = load_config(path, stage="generate")
    assert "_1600ep/" in cfg.generate.init  # the official released generation weights
    assert cfg.data.sample_posterior is True  # DiT/SiT train on posterior samples
    assert (cfg.optim.lr, cfg.train.global_batch, cfg.ema.decay) == (1e-4, 256, 0.9999)


def test_random_resized_crop_resizes_bicubic_as_torchvision_interpolation_3():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resized_crop

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    top, left, h, w = 7, 11, 60, 70
    got = apply_view(image, View((top, left, h, w), 32))
    want = np.asarray(resized_crop(image, top, left, h, w, [32, 32], InterpolationMode.BICUBIC))
    assert np.array_equal(got, want)


def test_weight_decay_covers_the_tokens_as_timm_defaults_do():
    with torch.device("meta"):
        model = build_model("usp_vit_b")
    decay, no_decay = decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert len(decayed) == 85  # 12 x 4 encoder + 8 x 4 decoder block matrices, patch conv, cls/mask tokens, ...
    assert {"cls_token", "mask_token"} <= decayed
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in no_decay["params"])


def test_patch_conv_bias_keeps_the_default_conv_init():
    torch.manual_seed(0)
    model = build_model("usp_vit_b")
    bias = model.patch_embed.proj.bias
    bound = 1 / math.sqrt(4 * 2 * 2)  # PyTorch's conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert bias.abs().max() <= bound and bias.std() > 0.5 * bound / math.sqrt(3)


def test_sincos_table_puts_the_column_in_the_first_half():
    """MAE/DiT get_2d_sincos_pos_embed: emb[h * G + w] = [sin(w w_k), cos(w w_k), sin(h w_k), cos(h w_k)] with
    w_k = 1 / 10000^(k / (D/4)), k < D/4."""
    D, G = 16, 5
    emb = sincos_pos_embed_2d(D, G).double().numpy()
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    for h in range(G):
        for w in range(G):
            want = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
            assert np.allclose(emb[h * G + w], want, atol=1e-6), (h, w)


def test_a_usp_start_keeps_dits_tanh_gelu(tmp_path):
    from usp_fast.stages.generate import GenerateStage

    cfg = load_config(None, ["model.name=DiT-Test/2", f"run.out_dir={tmp_path}"], stage="generate")
    manifest = {"latent_channels": 4, "latent_size": 8, "num_classes": 3}
    export_meta = {"config": {"mlp_act": "gelu"}}  # the ViT pretrained with the exact GELU
    stage = GenerateStage(cfg)
    assert stage.model_spec(manifest, export_meta).mlp_act == "gelu_tanh"
    assert stage.model_spec(manifest, None).mlp_act == "gelu_tanh"  # scratch and USP arms share an architecture
    opt_in = GenerateStage(load_config(None, ["model.name=DiT-Test/2", "generate.mlp_act=gelu"], stage="generate"))
    assert opt_in.model_spec(manifest, export_meta).mlp_act == "gelu"


def test_steps_per_epoch_drop_the_last_partial_batch():
    plan = StreamPlan(IMAGENET_TRAIN, 0, 4096, 64, 64, 0, drop_last=True)
    assert plan.steps_per_epoch == 312
    assert 800 * plan.steps_per_epoch == 249_600 and warmup_length(40, None, plan.steps_per_epoch) == 12_480
    # a small plan: each epoch is floor(N / G) whole steps of one permutation, no sample twice within it
    n, G, b, W = 50, 16, 4, 2
    plans = [StreamPlan(n, 3, G, b, W, r, drop_last=True) for r in range(W)]
    for epoch in range(3):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            for p in plans:
                for m in range(p.accum):
                    idx, _, _, epochs = p.micro_batch(step, m)
                    assert (epochs == epoch).all()
                    seen += idx.tolist()
        assert len(seen) == 48 == len(set(seen))
    assert load_config(None, stage="pretrain").train.drop_last is True
    with pytest.raises(ValueError, match="drop_last"):
        StreamPlan(10, 0, 16, 4, 1, 0, drop_last=True)


def test_precision_choices_are_documented_against_the_official_recipe():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Differences from the official recipe"):]
    table = table[: table.index("\n## ", 5)]
    assert "fp16 autocast" in table and "train.precision=fp32" in table
    cfg = load_config(None, ["train.precision=fp32"], stage="generate")
    from usp_fast.engine import compute_dtype

    assert compute_dtype(cfg, torch.device("cuda")) == torch.float32  # TF32 matmuls are switched on with it
    assert yaml.safe_load((CONFIGS / "pretrain" / "vit_b.yaml").read_text())["train"]["precision"] == "auto"
