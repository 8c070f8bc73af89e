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
