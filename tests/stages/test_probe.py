"""Linear probe and per-block probe on a small real labelled set: scikit-image's LFW subset (100 faces, 100
non-faces), cached with the tiny VAE; a frozen usp_vit_test encoder; held-out validation images."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RESOLUTION
from usp_fast.stages import load_config
from usp_fast.artifacts import save_encoder
from usp_fast.models.usp_vit import build_model
from usp_fast.cli import main as cli_main
from usp_fast.stages.probe import encoder_features, resolve_blocks


@pytest.fixture(scope="session")
def lfw_folders(tmp_path_factory):
    """train/ and val/ ImageFolders: 70 + 30 images per class, 64 px RGB."""
    from skimage import data

    faces = data.lfw_subset()  # [200, 25, 25] in [0, 1]: the first 100 are faces
    root = tmp_path_factory.mktemp("lfw")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("face", "nonface")):
        idx = rng.permutation(100) + 100 * label
        for split, part in (("train", idx[:70]), ("val", idx[70:])):
            d = root / split / name
            d.mkdir(parents=True)
            for i in part:
                img = Image.fromarray((faces[i] * 255).astype(np.uint8)).convert("RGB")
                img.resize((RESOLUTION, RESOLUTION), Image.BICUBIC).save(d / f"{i:03d}.png")
    return root


def probe_overrides(root, tmp, vae_dir, export):
    return [f"run.out_dir={tmp / 'runs'}", "run.name=probe", f"data.root={root / 'train'}",
            f"data.cache_dir={root / 'cache_train'}", f"data.resolution={RESOLUTION}", "data.num_workers=0",
            f"vae.name={vae_dir}", "cache.shard_size=64", f"probe.encoder={export}",
            f"probe.val_cache_dir={root / 'cache_val'}", "train.epochs=100", "train.global_batch=70",
            "train.micro_batch=35", "optim.lr=6.4", "optim.warmup_epochs=4", "optim.weight_decay=0.0",
            "train.log_every=50", "probe.feature_batch=64"]


@pytest.fixture(scope="session")
def lfw_setup(lfw_folders, tiny_vae_dir, tmp_path_factory):
    from usp_fast.data.cache import build_cache
    from usp_fast.vae import load_vae

    tmp = tmp_path_factory.mktemp("probe_run")
    torch.manual_seed(0)
    model = build_model("usp_vit_test", in_chans=4, input_size=RESOLUTION // 8)
    vae = load_vae(str(tiny_vae_dir))
    export = save_encoder(model, tmp / "export", "usp_vit_test", vae.identity, RESOLUTION, 0, 0.0)
    cfg = load_config(None, probe_overrides(lfw_folders, tmp, tiny_vae_dir, export), stage="probe")
    build_cache(cfg, vae, torch.device("cpu"))
    val = load_config(None, [f"data.root={lfw_folders / 'val'}", f"data.cache_dir={lfw_folders / 'cache_val'}",
                             f"data.resolution={RESOLUTION}", "data.num_workers=0", f"vae.name={tiny_vae_dir}"])
    build_cache(val, vae, torch.device("cpu"))
    return tmp, export, model


def test_block_features_come_from_the_encoders_own_forward(lfw_setup):
    _, _, model = lfw_setup
    x = torch.randn(3, 4, 8, 8)
    f = encoder_features(model.eval(), x, "cls", blocks=[0, 1])
    full = model.forward_encoder(x)
    torch.testing.assert_close(f["final"], full[:, 0])
    assert not torch.allclose(f["block_1"], f["final"])  # before the final norm
    torch.testing.assert_close(model.norm(torch.stack([f["block_1"]], 1))[:, 0], f["final"])
    avg = encoder_features(model, x, "avg")["final"]
    torch.testing.assert_close(avg, full[:, 1:].mean(1))
    assert resolve_blocks([-1], 2) == [0, 1] and resolve_blocks([], 2) == []
    with pytest.raises(ValueError, match=r"probe.blocks \[5\]"):
        resolve_blocks([5], 2)


def test_linear_and_per_block_probe_beat_chance_on_held_out_faces(lfw_setup, lfw_folders, tiny_vae_dir, one_thread):
    tmp, export, _ = lfw_setup
    config = tmp / "probe.yaml"
    config.write_text("probe:\n  pool: avg\n  blocks: [-1]\n")
    overrides = probe_overrides(lfw_folders, tmp, tiny_vae_dir, export)
    result = cli_main(["train", "--stage", "probe", "--config", str(config), *overrides])
    acc = result["accuracy"]
    assert set(acc) == {"block_0", "block_1", "final"}
    assert result["num_train"] == 140 and result["num_eval"] == 60 and result["num_classes"] == 2
    for name, a in acc.items():
        assert a["top1"] >= 75.0, (name, acc)  # chance is 50% on the balanced held-out set
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    saved = json.loads((tmp / "runs" / "probe" / "probe.json").read_text())
    assert saved["accuracy"] == acc and saved["evaluated_on"].endswith("cache_val")
    plot = np.asarray(Image.open(saved["blocks_plot"]).convert("RGB"))  # the Figure-4 style plot
    assert plot.shape[0] >= 200 and plot.shape[1] >= 300 and plot.std() > 5


def test_stage_probe_runs_the_same_probe(lfw_setup, lfw_folders, tiny_vae_dir, one_thread):
    """`usp_fast/train.py --stage probe` (the deepspeed entry point) is `usp-fast train --stage probe`: same result."""
    from usp_fast.cli import train_main

    tmp, export, _ = lfw_setup
    config = tmp / "probe_cls.yaml"
    config.write_text("probe:\n  pool: cls\n")
    overrides = probe_overrides(lfw_folders, tmp, tiny_vae_dir, export) + ["train.epochs=20"]
    direct = cli_main(["train", "--stage", "probe", "--config", str(config), *overrides])
    staged = train_main(["--stage", "probe", "--config", str(config), *overrides])
    assert set(staged["accuracy"]) == {"final"}
    assert staged["accuracy"] == direct["accuracy"] and staged["history"] == direct["history"]


@pytest.fixture(scope="session")
def dit_generator(lfw_setup):
    """A tiny DiT saved as a generate run's generator/ folder, its adaLN-Zero blocks given non-zero modulation so
    the residual stream changes from block to block."""
    from safetensors.torch import save_file

    from usp_fast.artifacts import GENERATOR_FORMAT
    from usp_fast.models.dit import build_model as build_dit

    tmp, _, _ = lfw_setup
    torch.manual_seed(0)
    model = build_dit("DiT-Test/2", in_channels=4, input_size=RESOLUTION // 8, num_classes=2)
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[1].weight, std=0.05)
    d = tmp / "generator"
    d.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    save_file(state, str(d / "ema.safetensors"))
    (d / "generator.json").write_text(json.dumps({"format": GENERATOR_FORMAT, "model": "DiT-Test/2",
                                                  "config": model.config_dict(), "objective": "ddpm", "step": 0}))
    return d, model.eval()


def test_dit_block_features_are_the_residual_stream(dit_generator):
    from usp_fast.diffusion import create_objective
    from usp_fast.stages.probe import generator_features

    _, model = dit_generator
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([0, 1, 2])
    feats = model.block_features(x, t, y, [0, 1])
    # reference: the plain adaLN-Zero formula, block by block, on the un-fused path
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for i, block in enumerate(model.blocks):
        sh1, sc1, g1, sh2, sc2, g2 = block.modulation(c)
        ln = torch.nn.functional.layer_norm
        h = ln(tokens, (tokens.shape[-1],), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        tokens = tokens + g1[:, None] * block.attn(h)
        h = ln(tokens, (tokens.shape[-1],), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        tokens = tokens + g2[:, None] * block.mlp(h)
        torch.testing.assert_close(feats[i], tokens.mean(1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])
    # level 0.5 -> DiT timestep 500 of q_sample with the generator's noise, null class; the same seed repeats
    objective = create_objective("ddpm")
    a = generator_features(model, objective, x, [1], 0.5, torch.Generator().manual_seed(1))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    t500 = torch.full((3,), 500)
    want = model.block_features(objective.q_sample(x, t500, noise), t500, torch.full((3,), 2), [1])[1]
    torch.testing.assert_close(a["block_1"], want)
    b1 = generator_features(model, objective, x, [1], 0.5, torch.Generator().manual_seed(1))
    b2 = generator_features(model, objective, x, [1], 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(b1["block_1"], b2["block_1"]) and torch.equal(a["block_1"], b1["block_1"])
    b3 = generator_features(model, objective, x, [1], 0.9, torch.Generator().manual_seed(1))
    assert not torch.allclose(b1["block_1"], b3["block_1"])


def test_per_block_probe_of_a_dit_beats_chance(lfw_setup, lfw_folders, tiny_vae_dir, dit_generator, one_thread):
    tmp, _, _ = lfw_setup
    gen_dir, _ = dit_generator
    config = tmp / "probe_dit.yaml"
    # level 0: the least noisy timestep (the tiny test VAE's latents have std ~0.03, below DiT noise at t > 10)
    config.write_text("probe:\n  noise_level: 0.0\n")
    overrides = [o for o in probe_overrides(lfw_folders, tmp, tiny_vae_dir, "") if not o.startswith("probe.encoder")]
    result = cli_main(["train", "--stage", "probe", "--config", str(config), *overrides,
                       f"probe.generator={gen_dir}", "run.name=probe_dit"])
    acc = result["accuracy"]
    assert set(acc) == {"block_0", "block_1"} and result["noise_level"] == 0.0
    for name, a in acc.items():
        assert a["top1"] >= 70.0, (name, acc)  # chance is 50% on the balanced held-out set
    with pytest.raises(ValueError, match="exactly one of probe.encoder"):
        cli_main(["--debug", "train", "--stage", "probe", "--config", str(config), *overrides])


def test_probe_normalises_latents_as_the_encoder_was_pretrained(tmp_path):
    """An encoder pretrained with vae.normalize=channel sees (z - mean) / std: the probe must feed it the same."""
    from usp_fast.config import ProbeSection
    from usp_fast.stages.probe import feature_source

    torch.manual_seed(0)
    model = build_model("usp_vit_test", in_chans=4, input_size=4).eval()
    norm = {"mode": "channel", "mean": [0.5, -1.0, 0.0, 2.0], "std": [2.0, 0.5, 1.0, 4.0]}
    export = save_encoder(model, tmp_path / "export", "usp_vit_test", None, 32, 0, 0.0,
                          extra_meta={"latent_norm": norm})
    fn, meta, _ = feature_source(ProbeSection(encoder=str(export)), 0, "cpu")
    z = torch.randn(3, 4, 4, 4) * 3
    mean, std = torch.tensor(norm["mean"]).view(1, 4, 1, 1), torch.tensor(norm["std"]).view(1, 4, 1, 1)
    want = encoder_features(model, (z - mean) / std, "cls")["final"]
    got = fn(z, 0)["final"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(encoder_features(model, z, "cls")["final"], want, atol=1e-3)
