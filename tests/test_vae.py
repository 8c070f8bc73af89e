import logging

import pytest
import torch

from usp_fast.vae import VAEError, load_vae


def test_offline_hub_id_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(VAEError) as e:
        load_vae("stabilityai/sd-vae-ft-ema")
    msg = str(e.value)
    assert "stabilityai/sd-vae-ft-ema" in msg and "vae.name=DIR" in msg and "save_pretrained" in msg


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(VAEError, match="config.json"):
        load_vae(str(tmp_path))


def test_a_bad_vae_name_is_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    """VAEError is a user error: a stage with an unloadable vae.name prints one line and exits 2."""
    from usp_fast.cli import main
    from usp_fast.errors import UserError

    assert issubclass(VAEError, UserError)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "c.yaml").write_text("run:\n  name: bad_vae\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--stage", "cache", "--config", str(tmp_path / "c.yaml"), f"data.root={tmp_path}", "data.demo_images=4",
              "vae.name=pixels:99", f"run.out_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'c'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "pixels:99" in err[0], err


def test_local_vae_is_frozen_and_scaled(tiny_vae_dir):
    vae = load_vae(str(tiny_vae_dir), scale=0.5)
    assert not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == (2, 4, 8, 8) and (std > 0).all()
    raw = vae.module.encode(x).latent_dist
    assert torch.allclose(mean, raw.mean * 0.5) and torch.allclose(std, raw.std * 0.5)
    assert vae.decode(mean).shape == (2, 3, 64, 64)
    assert vae.identity["kind"] == "local" and len(vae.identity["fingerprint"]) == 16


def test_random_sd_is_the_sd_architecture_and_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        vae = load_vae("random-sd")
    assert "UNTRAINED" in caplog.text
    assert vae.latent_channels == 4 and vae.downsample == 8
    assert list(vae.module.config.block_out_channels) == [128, 256, 512, 512]
    assert load_vae("random-sd").identity["fingerprint"] == vae.identity["fingerprint"]  # seeded


def test_latent_norm_round_trip_and_pooled_statistics():
    import numpy as np

    from usp_fast.vae import LatentNorm

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal([[-0.3], [0.2], [0.0]], [[0.6], [1.0], [0.8]], (3, 5000))).float()
    manifest = {"latent_mean": x.mean(1).tolist(), "latent_std": x.std(1, unbiased=False).tolist()}
    z = x.T.reshape(1000, 5, 3).permute(0, 2, 1)[..., None]  # [B, C, 5, 1]
    for mode in ("channel", "scalar"):
        norm = LatentNorm.from_manifest(mode, manifest)
        y = norm.normalize(z)
        torch.testing.assert_close(norm.denormalize(y), z, atol=1e-5, rtol=0)
        again = LatentNorm.from_dict(norm.as_dict())
        torch.testing.assert_close(again.normalize(z), y)
    per_channel = LatentNorm.from_manifest("channel", manifest).normalize(z)
    torch.testing.assert_close(per_channel.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    pooled = LatentNorm.from_manifest("scalar", manifest).normalize(z)  # one mean/std: the pooled moments
    assert abs(float(pooled.mean())) < 1e-4 and abs(float(pooled.std(unbiased=False)) - 1) < 1e-4
    assert LatentNorm().normalize(z) is z
    with pytest.raises(ValueError, match="statistics"):
        LatentNorm.from_manifest("channel", {})


def test_training_sees_normalised_latents_and_exports_record_it(tmp_path, built_cache, tiny_vae_dir):
    import json
    from pathlib import Path

    from conftest import make_cfg
    from usp_fast.artifacts import load_encoder
    from usp_fast.engine import Trainer
    from usp_fast.stages.pretrain import PretrainStage

    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={built_cache.data.cache_dir}",
                   "train.max_steps=5", "vae.normalize=channel", "data.sample_posterior=false",
                   "train.global_batch=40", "train.micro_batch=40")
    seen = []

    class Spy(PretrainStage):
        def loss(self, model, batch, generator):
            seen.append(batch["latents"].detach().clone())
            return super().loss(model, batch, generator)

    result = Trainer(cfg, Spy(cfg)).train()
    manifest = json.loads((Path(built_cache.data.cache_dir) / "manifest.json").read_text())
    meta = load_encoder(result["export"])[1]
    assert meta["latent_norm"]["mode"] == "channel"
    torch.testing.assert_close(torch.tensor(meta["latent_norm"]["mean"]), torch.tensor(manifest["latent_mean"]))
    z = torch.cat(seen)  # every image once per epoch (flip and view vary): close to zero mean, unit std
    assert z.mean((0, 2, 3)).abs().max() < 0.5 and (z.std((0, 2, 3)) - 1).abs().max() < 0.5


def test_pixels_is_an_exact_weight_free_space_to_depth(caplog):
    from usp_fast.pictures import to_uint8

    with caplog.at_level(logging.WARNING):
        vae = load_vae("pixels", scale=1.0)
    assert "NOT a learned VAE" in caplog.text
    assert vae.latent_channels == 192 and vae.downsample == 8 and vae.identity["kind"] == "pixels"
    assert not list(vae.parameters())
    u = torch.randint(0, 256, (2, 3, 32, 48))
    x = u.float() / 127.5 - 1
    mean, std = vae.encode(x)
    assert mean.shape == (2, 192, 4, 6) and not std.any()
    assert torch.equal(mean[0, :, 1, 2].view(3, 8, 8), x[0, :, 8:16, 16:24])  # block (1, 2), channel-major
    back = torch.from_numpy(to_uint8(vae.decode(mean))).permute(0, 3, 1, 2)
    assert torch.equal(back.long(), u)  # exactly invertible, to the pixel value


def test_pixels_factor_sets_channels_and_resolution():
    vae = load_vae("pixels:4", scale=1.0)
    assert vae.latent_channels == 48 and vae.downsample == 4 and vae.identity["config"] == "space-to-depth 4"
    x = torch.rand(1, 3, 16, 8) * 2 - 1
    mean, _ = vae.encode(x)
    assert mean.shape == (1, 48, 4, 2)
    assert torch.equal(mean[0, :, 2, 1].view(3, 4, 4), x[0, :, 8:12, 4:8])
    torch.testing.assert_close(vae.decode(mean), x, rtol=0, atol=1e-6)
    with pytest.raises(VAEError, match="factor must be 1-16"):
        load_vae("pixels:32", scale=1.0)
