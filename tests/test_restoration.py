"""Masked-latent restoration: exactness on visible patches, the un-normalisation with visible-patch statistics,
and the CLI on a tiny pretrain run (tiny VAE, usp_vit_test)."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RESOLUTION, make_cfg
from usp_fast.models.layers import patchify, unpatchify
from usp_fast.models.usp_vit import build_model
from usp_fast.cli import main as cli_main
from usp_fast.restoration import restore_latents


def tiny_model():
    torch.manual_seed(0)
    return build_model("usp_vit_test", in_chans=4, input_size=8).eval()


def test_visible_patches_are_kept_and_ratio_zero_is_identity():
    model = tiny_model()
    x = torch.randn(3, 4, 8, 8)
    out, mask = restore_latents(model, x, 0.5, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [8.0] * 3  # half of 16 patches
    vis = mask == 0
    torch.testing.assert_close(patchify(out, 2)[vis], patchify(x, 2)[vis], rtol=0, atol=0)
    assert not torch.allclose(patchify(out, 2)[~vis], patchify(x, 2)[~vis])
    same, mask0 = restore_latents(model, x, 0.0)
    assert mask0.sum() == 0 and torch.equal(same, x)
    with pytest.raises(ValueError, match="mask ratio 1"):
        restore_latents(model, x, 1.0)


def test_oracle_decoder_restores_exactly_when_patches_share_statistics(monkeypatch):
    """Every patch a permutation of one vector -> equal per-patch mean/var, so visible-patch statistics undo the
    normalisation of a perfect (oracle) decoder exactly."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    v = torch.randn(16, generator=g) * 3 + 1.5
    patches = torch.stack([v[torch.randperm(16, generator=g)] for _ in range(2 * 16)]).reshape(2, 16, 16)
    x = unpatchify(patches, 2, 4)
    t = patchify(x, 2)
    normed = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + model.cfg.norm_pix_eps).sqrt()
    monkeypatch.setattr(model, "forward_decoder", lambda latent, ids_restore: normed)
    out, mask = restore_latents(model, x, 0.75, torch.Generator().manual_seed(0))
    assert mask.sum() == 2 * 12
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_cli_writes_rows_of_original_masked_restored(tmp_path, built_cache, tiny_vae_dir, demo_images):
    from usp_fast.data.images import center_crop, list_images, load_rgb
    from usp_fast.engine import Trainer
    from usp_fast.stages.pretrain import PretrainStage

    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={built_cache.data.cache_dir}",
                   "train.max_steps=4", "train.export=false")
    Trainer(cfg, PretrainStage(cfg)).train()
    run = tmp_path / "runs" / "t"
    items, _ = list_images(demo_images)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (p, _) in enumerate(items[:3]):
        Image.open(p).save(folder / f"{i}.png")
    out = cli_main(["restore", "--run", str(run), "--images", str(folder), "--num", "3", "--mask-ratio", "0.5",
                "--out", str(tmp_path / "r.png"), "--device", "cpu"])
    png = np.asarray(Image.open(out))
    R, gap = RESOLUTION, 2
    assert png.shape == (3 * R + 2 * gap, 3 * R + 2 * gap, 3) and png.dtype == np.uint8
    for i, (p, _) in enumerate(items[:3]):
        row = png[i * (R + gap): i * (R + gap) + R]
        original, masked, restored = row[:, :R], row[:, R + gap: 2 * R + gap], row[:, 2 * R + 2 * gap:]
        assert np.abs(original.astype(int) - center_crop(load_rgb(p), R).astype(int)).max() <= 1
        grey = (masked == 128).all(-1)
        patch_px = 2 * 8  # latent patch 2 x VAE stride 8
        blocks = grey.reshape(R // patch_px, patch_px, R // patch_px, patch_px).all((1, 3))
        assert blocks.sum() == 8  # half of the 4x4 latent patches, whole blocks greyed
        assert (masked[~grey] == original[~grey]).all()
        assert restored.std() > 1 and restored.min() >= 0 and restored.max() <= 255
        assert not np.array_equal(restored, original)
