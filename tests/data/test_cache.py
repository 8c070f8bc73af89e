import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RESOLUTION, make_cfg
from usp_fast.data.cache import CacheError, LatentCache, build_cache, cache_status, check_manifest
from usp_fast.data.images import BadImage, SourceError, center_crop, list_images, load_rgb
from usp_fast.data.stream import StreamPlan
from usp_fast.vae import load_vae


def _photo(size=(80, 60)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def odd_images(tmp_path):
    """One ImageFolder class holding every kind of input the loader must handle."""
    d = tmp_path / "train" / "c0"
    d.mkdir(parents=True)
    _photo().save(d / "rgb.JPEG")
    _photo().convert("L").save(d / "gray.JPEG")
    _photo().convert("CMYK").save(d / "cmyk.JPEG")
    _photo().convert("RGBA").save(d / "alpha.png")
    (d / "empty.JPEG").write_bytes(b"")
    (d / "garbage.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 20)
    good = (d / "rgb.JPEG").read_bytes()
    (d / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    return tmp_path


def test_decoder_handles_modes_and_names_bad_files(odd_images):
    d = odd_images / "train" / "c0"
    for name in ("rgb.JPEG", "gray.JPEG", "cmyk.JPEG", "alpha.png"):
        im = load_rgb(d / name)
        assert im.mode == "RGB" and im.size == (80, 60)
    for name, reason in (("empty.JPEG", "empty file"), ("garbage.JPEG", "cannot decode"),
                         ("truncated.JPEG", "cannot decode")):
        with pytest.raises(BadImage, match=reason) as e:
            load_rgb(d / name)
        assert name in str(e.value)


def test_center_crop_is_adm_style():
    big = _photo((1000, 500))
    out = center_crop(big, 64)
    assert out.shape == (64, 64, 3)
    # a 2:1 image keeps its centre: cropping the same image padded on both sides gives the same result
    assert center_crop(_photo((64, 64)), 64).shape == (64, 64, 3)


def test_file_list_source(tmp_path, odd_images):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\ntrain/c0/rgb.JPEG 3\n\ntrain/c0/gray.JPEG\n")
    items, classes = list_images(file_list=lst)
    assert [(p.split("/")[-1], y) for p, y in items] == [("rgb.JPEG", 3), ("gray.JPEG", 0)]
    assert len(classes) == 4
    with pytest.raises(SourceError, match="exactly one"):
        list_images()
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SourceError, match="no images"):
        list_images(root=tmp_path / "nothing")
    with pytest.raises(SourceError, match="not a directory"):
        list_images(root=tmp_path / "absent")


def test_cache_skips_bad_images_and_names_them(tmp_path, odd_images, tiny_vae_dir, caplog):
    cfg = make_cfg(tmp_path, odd_images, tiny_vae_dir)
    with caplog.at_level(logging.WARNING):
        build_cache(cfg, load_vae(str(tiny_vae_dir)), torch.device("cpu"))
    manifest = check_manifest(cfg.data.cache_dir, cfg)
    assert manifest["count"] == 4 and manifest["num_images"] == 7
    skipped = sorted(s["path"].split("/")[-1] for s in manifest["skipped"])
    assert skipped == ["empty.JPEG", "garbage.JPEG", "truncated.JPEG"]
    for name in skipped:
        assert name in caplog.text

    fatal = make_cfg(tmp_path, odd_images, tiny_vae_dir, f"data.cache_dir={tmp_path / 'c2'}",
                     "data.fatal_bad_images=true")
    with pytest.raises(CacheError, match="fatal_bad_images"):
        build_cache(fatal, load_vae(str(tiny_vae_dir)), torch.device("cpu"))
    assert cache_status(fatal.data.cache_dir) != "complete"


def test_cache_contents_match_a_direct_encode(built_cache, tiny_vae_dir):
    cfg = built_cache
    manifest = check_manifest(cfg.data.cache_dir, cfg)
    assert manifest["count"] == 40 and len(manifest["shards"]) == 3  # 16 + 16 + 8
    assert manifest["latent_channels"] == 4 and manifest["latent_size"] == RESOLUTION // 8
    assert manifest["vae"]["name"] == str(tiny_vae_dir) and manifest["vae"]["scale"] == 0.18215
    assert len(manifest["image_list_sha256"]) == 64 and manifest["crop"] == "adm-center"
    cache = LatentCache(cfg.data.cache_dir, manifest)
    items, _ = list_images(cfg.data.root)
    vae = load_vae(str(tiny_vae_dir))
    from usp_fast.data.images import to_tensor
    i = 21
    x = to_tensor(center_crop(load_rgb(items[i][0]), RESOLUTION))[None]
    mean, std = vae.encode(torch.cat([x, x.flip(-1)]))
    for flip in (0, 1):
        m, s, y = cache.read(np.array([i]), np.array([flip]))
        assert y[0] == items[i][1]
        assert np.allclose(m[0], mean[flip].numpy(), atol=2e-3) and np.allclose(s[0], std[flip].numpy(), atol=2e-3)
        assert m.dtype == np.float16
    # the flipped latent differs from the plain one (the VAE is not flip-equivariant)
    assert not np.allclose(cache.read([i], [0])[0], cache.read([i], [1])[0])


def test_cache_resume_skips_finished_shards(tmp_path, built_cache, tiny_vae_dir):
    cfg = built_cache
    cache_dir = tmp_path / "cache"
    shutil.copytree(cfg.data.cache_dir, cache_dir)
    (cache_dir / "manifest.json").unlink()
    (cache_dir / "shard_00001.json").unlink()  # shard 1 was interrupted
    (cache_dir / "shard_00001.npy").unlink()
    cfg2 = make_cfg(tmp_path, cfg.data.root, tiny_vae_dir, f"data.cache_dir={cache_dir}")
    with pytest.raises(CacheError, match="partial"):
        check_manifest(cache_dir, cfg2)
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard_0000[02].*")}
    build_cache(cfg2, load_vae(str(tiny_vae_dir)), torch.device("cpu"))
    after = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard_0000[02].*")}
    assert before == after  # finished shards untouched
    assert json.loads((cache_dir / "manifest.json").read_text())["count"] == 40
    assert np.array_equal(np.load(cache_dir / "shard_00001.npy"), np.load(Path(cfg.data.cache_dir) / "shard_00001.npy"))


def test_cache_refuses_mismatch(tmp_path, built_cache, tiny_vae_dir):
    cfg = built_cache
    other = make_cfg(tmp_path, cfg.data.root, tiny_vae_dir, f"data.cache_dir={cfg.data.cache_dir}",
                     "data.resolution=128", "vae.scale=0.5")
    with pytest.raises(CacheError) as e:
        check_manifest(cfg.data.cache_dir, other)
    assert "resolution: cache has 64, config expects 128" in str(e.value) and "vae.scale" in str(e.value)
    with pytest.raises(CacheError, match="different cache"):  # building into it is refused too
        build_cache(other, load_vae(str(tiny_vae_dir)), torch.device("cpu"))
    with pytest.raises(CacheError, match="no latent cache"):
        check_manifest(tmp_path / "absent", cfg)


@pytest.mark.parametrize("world,micro", [(1, 4), (2, 2), (3, 1)])
def test_stream_sees_every_sample_once_per_epoch(world, micro):
    n, G = 23, 6 if world == 3 else 8
    plans = [StreamPlan(n, 5, G, micro, world, r) for r in range(world)]
    seen = []
    for step in range(4 * n // G + 1):
        for m in range(plans[0].accum):
            for p in plans:
                seen += p.micro_batch(step, m)[0].tolist()
    for e in range(len(seen) // n):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n]  # reshuffled per epoch
    # determinism: a fresh plan reproduces any step (what exact resume relies on)
    fresh = StreamPlan(n, 5, G, micro, world, 0)
    assert np.array_equal(fresh.micro_batch(3, 0)[0], plans[0].micro_batch(3, 0)[0])
    with pytest.raises(ValueError, match="multiple"):
        StreamPlan(n, 0, 10, 4, 1, 0)
