"""VAE back ends beyond SD: other AutoencoderKL shapes and TAESD-family weights (the real taef2 when present)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from usp_fast.data.images import list_images, load_rgb, to_tensor
from usp_fast.vae import VAEError, load_vae, taesd_decoder, taesd_encoder

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
TAEF2 = SHARED / "weights" / "taef2"
SAMPLES_256 = SHARED / "data" / "imagenet-samples-256"


def test_autoencoderkl_c16s16_channels_and_downsampling_follow_the_config(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=4,
                  down_block_types=["DownEncoderBlock2D"] * 5, up_block_types=["UpDecoderBlock2D"] * 5,
                  block_out_channels=[8, 8, 8, 16, 16]).save_pretrained(tmp_path)
    vae = load_vae(str(tmp_path), scale=1.0)
    assert (vae.latent_channels, vae.downsample) == (16, 16)
    mean, std = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert mean.shape == std.shape == (1, 16, 4, 4)
    assert vae.identity["downsample"] == 16 and vae.identity["latent_channels"] == 16


def _write_taesd(d, channels, gn, seed=0):
    torch.manual_seed(seed)
    torch.save(taesd_encoder(channels, gn).state_dict(), d / "tiny_encoder.pth")
    torch.save(taesd_decoder(channels, gn).state_dict(), d / "tiny_decoder.pth")


@pytest.mark.parametrize("gn", [False, True])
def test_taesd_layout_loads_with_its_keys_untied_and_scaled(tmp_path, gn):
    _write_taesd(tmp_path, 8, gn)
    vae = load_vae(str(tmp_path), scale=0.5)
    assert vae.identity["kind"] == "taesd" and (vae.latent_channels, vae.downsample) == (8, 8)
    enc = torch.load(tmp_path / "tiny_encoder.pth", weights_only=True)
    got = vae.module.encoder.state_dict()
    assert set(got) == set(enc) and all(torch.equal(got[k], enc[k]) for k in enc)  # the key map is the identity
    dec_params = list(vae.module.decoder.parameters())
    assert len({p.data_ptr() for p in dec_params}) == len(dec_params)  # no weight silently shared
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == (2, 8, 4, 4) and not std.any()  # deterministic
    assert torch.allclose(mean, vae.module.encoder(x * 0.5 + 0.5) * 0.5)  # TAESD takes [0, 1]
    assert vae.decode(mean).shape == (2, 3, 32, 32)


def test_taesd_wrong_layout_names_the_folder(tmp_path):
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "x_encoder.pth")
    torch.save({}, tmp_path / "x_decoder.pth")
    with pytest.raises(VAEError, match="upstream taesd.py layout") as e:
        load_vae(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_taef2_reconstructs_real_images():
    if not (TAEF2.is_dir() and SAMPLES_256.is_dir()):
        pytest.skip(f"../shared is absent ({TAEF2} / {SAMPLES_256}): the real-weights check needs it")
    vae = load_vae(str(TAEF2), scale=1.0)
    assert (vae.latent_channels, vae.downsample) == (32, 8)
    items, _ = list_images(SAMPLES_256)
    x = torch.stack([to_tensor(np.asarray(load_rgb(p)))[:, 64:192, 64:192] for p, _ in items[::250]])  # 4
    with torch.no_grad():
        rec = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / (rec - x).pow(2).mean((1, 2, 3)))
    # measured 21.5-31 dB (mean 28); a wrong layer order, GroupNorm or tied weights gives ~10-20 dB
    assert psnr.mean() > 26 and psnr.min() > 18, psnr.tolist()
