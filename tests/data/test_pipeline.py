"""Crop views, the PIL and DALI decoders, bad input, cache views and latent statistics."""
import json
import logging

import numpy as np
import pytest
import torch

from conftest import RESOLUTION, make_cfg
from test_cache import _photo, odd_images  # noqa: F401 - the fixture of every odd input kind
from usp_fast.data.cache import LatentCache, build_cache, check_manifest
from usp_fast.data.images import apply_view, draw_view, list_images, load_rgb, rrc_window, to_tensor
from usp_fast.data.online import OnlineSource
from usp_fast.data.pipeline import PILDecoder, dali_available, make_decoder
from usp_fast.data.stream import StreamPlan
from usp_fast.vae import LatentNorm, load_vae

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def _makers(n, size, crop, seed=0):
    return [(lambda i: lambda w, h: draw_view(seed, 0, i, w, h, size, crop, flip=bool(i % 2)))(i) for i in range(n)]


def test_rrc_window_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = rrc_window(rng, 300, 200, scale=(0.2, 1.0))
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        assert 0.18 <= h * w / (300 * 200) <= 1.0 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    a, b = draw_view(3, 1, 7, 300, 200, 64), draw_view(3, 1, 7, 300, 200, 64)
    assert a.window == b.window and a.window != draw_view(3, 2, 7, 300, 200, 64).window  # (seed, epoch, index)
    assert draw_view(3, 1, 7, 300, 200, 64, crop="center").window is None


@needs_dali
@pytest.mark.parametrize("crop", ["rrc", "center"])
def test_dali_cpu_matches_pil_for_the_same_views(demo_images, crop):
    items, _ = list_images(demo_images)
    # ADM BOX-halves images whose short side is >= 2x the size, DALI resizes them in one antialiased bicubic
    # step (a few levels apart); the pixel-level match is checked where no halving happens
    paths = [p for p, _ in items if min(load_rgb(p).size) < 128][:6]
    a, ok_a, _ = PILDecoder("cpu", 0).decode(paths, _makers(6, 64, crop))
    b, ok_b, _ = make_decoder("dali", "cpu", 4, 1).decode(paths, _makers(6, 64, crop))  # 4 + a padded 2
    assert ok_a == ok_b == [True] * 6 and a.shape == b.shape == (6, 3, 64, 64)
    diff = (a - b).abs() * 127.5  # in 8-bit levels
    assert diff.mean() < 0.5 and torch.quantile(diff.flatten(), 0.99) <= 2.0, (diff.mean(), diff.max())
    assert (a[1] - a[1].flip(-1)).abs().mean() > 0.05  # odd samples are mirrored, and DALI agrees (above)


@pytest.mark.parametrize("kind", ["pil", pytest.param("dali", marks=needs_dali)])
def test_every_bad_input_kind_is_skipped_or_decoded_and_named(odd_images, kind):  # noqa: F811
    d = odd_images / "train" / "c0"
    _photo((300, 300)).save(d / "huge.JPEG")  # "very large" against the limit below
    names = ["rgb.JPEG", "gray.JPEG", "cmyk.JPEG", "alpha.png", "empty.JPEG", "garbage.JPEG", "truncated.JPEG",
             "huge.JPEG"]
    dec = make_decoder(kind, "cpu", 8, 1, max_pixels=250 * 250)
    x, ok, errors = dec.decode([d / n for n in names], _makers(len(names), 32, "center"))
    assert ok == [True] * 4 + [False] * 4 and x.shape == (4, 3, 32, 32)
    for name, err, reason in zip(names[4:], errors[4:], ["empty file", "cannot decode", "cannot decode",
                                                         "too large"]):
        assert name in err and reason in err
    ref = torch.stack([to_tensor(apply_view(load_rgb(d / n), draw_view(0, 0, i, 80, 60, 32, "center",
                                                                        flip=bool(i % 2))))
                       for i, n in enumerate(names[:4])])
    assert ((x - ref).abs() * 127.5).mean() < 1.0  # grayscale, CMYK and alpha decode like the PIL reference


def test_online_source_replaces_bad_files_deterministically(tmp_path, odd_images, tiny_vae_dir, caplog):  # noqa: F811
    cfg = make_cfg(tmp_path, odd_images, tiny_vae_dir, "data.source=online", "data.decoder=pil")
    with caplog.at_level(logging.WARNING):
        src = OnlineSource(cfg, load_vae(str(tiny_vae_dir)), "cpu")
    names = [p.split("/")[-1] for p, _ in src.items]  # empty and garbage fail the start-up probe: left out
    assert len(src) == 5 and "empty.JPEG" not in names and "garbage.JPEG" not in names
    idx = np.arange(len(src))
    with caplog.at_level(logging.WARNING):
        x, used, _ = src.images(idx, np.zeros_like(idx), np.zeros_like(idx))
    assert x.shape == (5, 3, RESOLUTION, RESOLUTION)
    bad = {"empty.JPEG", "garbage.JPEG", "truncated.JPEG"}  # truncated passes the header probe, fails the decode
    assert {names[i] for i in used.tolist()}.isdisjoint(bad)
    for i, u in zip(idx, used.tolist()):  # a bad file is replaced by the next good one in list order
        nxt = i
        while names[nxt] in bad:
            nxt = (nxt + 1) % len(names)
        assert u == nxt
    for name in bad:
        assert name in caplog.text
    assert len(src.bad) == 1


def test_manifest_statistics_are_those_of_the_stored_latents(built_cache):
    manifest = check_manifest(built_cache.data.cache_dir, built_cache)
    cache = LatentCache(built_cache.data.cache_dir, manifest)
    n = len(cache)
    mean, _, _ = cache.read(np.arange(n), np.zeros(n, dtype=int))
    m = mean.astype(np.float64)
    assert manifest["format"] == "usp-fast-latents/3" and manifest["views"] == 1
    assert np.allclose(manifest["latent_mean"], m.mean((0, 2, 3)), atol=2e-3)
    assert np.allclose(manifest["latent_std"], m.std((0, 2, 3)), atol=2e-3)
    assert len(manifest["latent_std"]) == 4 and min(manifest["latent_std"]) > 0


def test_cache_views_store_random_resized_crops(tmp_path, odd_images, tiny_vae_dir):  # noqa: F811
    cfg = make_cfg(tmp_path, odd_images, tiny_vae_dir, "cache.views=2", "run.seed=3")
    vae = load_vae(str(tiny_vae_dir))
    build_cache(cfg, vae, torch.device("cpu"))
    manifest = check_manifest(cfg.data.cache_dir, cfg)
    assert manifest["views"] == 3 and manifest["count"] == 4
    cache = LatentCache(cfg.data.cache_dir, manifest)
    shard = json.loads((tmp_path / "cache" / "shard_00000.json").read_text())
    i, row = shard["indices"][1], 1  # the grayscale image
    path = list_images(odd_images)[0][i][0]
    view = draw_view(3, 2, i, 80, 60, RESOLUTION, "rrc", (0.2, 1.0), flip=False)
    x = to_tensor(apply_view(load_rgb(path), view))[None]
    for flip in (0, 1):
        m, _, _ = cache.read([row], [flip], [2])
        assert np.allclose(m[0], vae.encode(x.flip(-1) if flip else x)[0][0].numpy(), atol=2e-3)
    assert not np.allclose(cache.read([row], [0], [1])[0], cache.read([row], [0], [2])[0])
    # the latent statistics are those of what trains: every view (not only the centre crop), with the posterior
    # variance recorded for runs that sample the posterior
    n = len(cache)
    reads = [cache.read(np.arange(n), np.zeros(n, dtype=int), np.full(n, v)) for v in range(3)]
    means = np.concatenate([r[0] for r in reads]).astype(np.float64)
    var = np.concatenate([r[1] for r in reads]).astype(np.float64) ** 2
    assert manifest["latent_stats_over"] == "3 views"
    assert np.allclose(manifest["latent_mean"], means.mean((0, 2, 3)), atol=2e-3)
    assert not np.allclose(manifest["latent_mean"], reads[0][0].astype(np.float64).mean((0, 2, 3)), atol=1e-4)
    assert np.allclose(manifest["latent_std"], means.std((0, 2, 3)), atol=2e-3)
    assert np.allclose(manifest["latent_posterior_var"], var.mean((0, 2, 3)), rtol=1e-2, atol=1e-5)
    sampled = LatentNorm.from_manifest("channel", manifest, sample_posterior=True)
    assert np.allclose(sampled.std.flatten().numpy(), np.sqrt(means.std((0, 2, 3)) ** 2 + var.mean((0, 2, 3))),
                       rtol=2e-3)
    # training draws one of the 3 views per image and epoch
    plan = StreamPlan(4, 0, 4, 4, 1, 0, views=3)
    views = np.concatenate([plan.micro_batch(s, 0)[2] for s in range(30)])
    assert set(views.tolist()) == {0, 1, 2}
