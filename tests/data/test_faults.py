"""Data faults never pass silently: a cache built with other settings, undecodable files on the online path,
an empty image folder."""
import logging
import shutil
from pathlib import Path

import pytest

from conftest import make_cfg
from usp_fast.data.cache import CacheError, cache_status
from usp_fast.errors import DataError
from usp_fast.data.prepare import prepare_data
from usp_fast.stages.cache import CacheStage


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def _no_vae(*args, **kwargs):
    raise AssertionError("the VAE must not load here")


def test_cache_stage_refuses_a_cache_built_with_other_settings(tmp_path, built_cache, tiny_vae_dir, monkeypatch,
                                                                caplog):
    cache_dir = tmp_path / "cache"  # make_cfg's data.cache_dir
    shutil.copytree(built_cache.data.cache_dir, cache_dir)
    before = _files(cache_dir)
    monkeypatch.setattr("usp_fast.vae.load_vae", _no_vae)  # every check below is made before the VAE loads
    root = built_cache.data.root

    other = make_cfg(tmp_path, root, tiny_vae_dir, "data.resolution=128", "cache.dtype=float32", stage="cache")
    with pytest.raises(CacheError) as e:
        CacheStage(other).run()
    msg = str(e.value)
    assert "data.resolution: cache has 64, config gives 128" in msg
    assert "cache.dtype: cache has 'float16', config gives 'float32'" in msg and str(cache_dir) in msg
    assert _files(cache_dir) == before  # nothing written, nothing removed (manifest bytes included)

    same = make_cfg(tmp_path, root, tiny_vae_dir, stage="cache")  # same settings: reused, and the log says so
    with caplog.at_level(logging.INFO, logger="usp_fast.data.prepare"):
        assert prepare_data(same, build_missing=True) == cache_dir
    assert "matches the config: reusing it" in caplog.text
    assert _files(cache_dir) == before

    # a partial cache (an interrupted build) with other settings is refused as well, before the VAE loads
    (cache_dir / "manifest.json").unlink()
    (cache_dir / "shard_00001.json").unlink()
    before = _files(cache_dir)
    assert cache_status(cache_dir) == "partial"
    with pytest.raises(CacheError, match=r"\(partial\): data\.resolution: cache has 64, config gives 128"):
        prepare_data(other, build_missing=True)
    assert _files(cache_dir) == before
    (cache_dir / "build.json").unlink()  # shards that say nothing about how they were built are not resumed
    before = _files(cache_dir)
    with pytest.raises(CacheError, match="no build.json"):
        prepare_data(same, build_missing=True)
    assert _files(cache_dir) == before


@pytest.fixture
def corrupt_images(tmp_path, demo_images):
    """The demo images plus two files of garbage with a .jpg name, next to good copies."""
    root = tmp_path / "images"
    shutil.copytree(demo_images, root)
    classes = sorted(d for d in (root / "train").iterdir() if d.is_dir())
    bad = [classes[0] / "a_corrupt.jpg", classes[-1] / "z_corrupt.jpg"]
    for p in bad:
        p.write_bytes(b"\x00\x01 not an image at all " * 50)
    return root, bad


def test_online_source_counts_only_decodable_images(tmp_path, demo_images, corrupt_images, tiny_vae_dir, caplog):
    import numpy as np

    from usp_fast.data.images import list_images
    from usp_fast.data.online import OnlineSource
    from usp_fast.engine import Trainer
    from usp_fast.stages.pretrain import PretrainStage
    from usp_fast.vae import load_vae

    root, bad = corrupt_images
    good = len(list_images(demo_images)[0])
    assert len(list_images(root)[0]) == good + 2
    online = ["data.source=online", "data.decoder=pil", f"data.cache_dir={tmp_path / 'no-cache'}"]
    cfg = make_cfg(tmp_path, root, tiny_vae_dir, *online, "train.epochs=1")
    vae = load_vae(str(tiny_vae_dir))
    with caplog.at_level(logging.WARNING):
        src = OnlineSource(cfg, vae, "cpu")
    assert len(src) == good == src.manifest["count"] and src.manifest["num_images"] == good + 2
    assert sorted(s["path"] for s in src.manifest["skipped"]) == sorted(map(str, bad))
    for p in bad:  # logged by name
        assert p.name in caplog.text
    assert f"2 of {good + 2} images skipped" in caplog.text
    idx = np.arange(len(src))  # one epoch: every index is a decodable file, none needs replacing
    _, used, _ = src.images(idx, np.zeros_like(idx), np.zeros_like(idx))
    assert used.tolist() == idx.tolist() and not src.bad

    trainer = Trainer(cfg, PretrainStage(cfg))  # steps per epoch from the decodable images: 40 / 8, not 42 / 8
    assert trainer.steps_per_epoch == good / cfg.train.global_batch == 5 and trainer.total_steps == 5
    assert trainer.plan.n == good  # the data order covers each decodable image once per epoch

    fatal = make_cfg(tmp_path, root, tiny_vae_dir, *online, "data.fatal_bad_images=true")
    with pytest.raises(DataError, match="fatal_bad_images") as e:
        OnlineSource(fatal, vae, "cpu")
    assert str(bad[0]) in str(e.value)  # the first bad file of the list


def test_empty_image_folder_is_refused_before_any_vae_loads(tmp_path, tiny_vae_dir, monkeypatch):
    from usp_fast.data.images import SourceError
    from usp_fast.data.prepare import check_data_source

    empty = tmp_path / "empty"
    (empty / "train" / "c0").mkdir(parents=True)
    (empty / "train" / "c0" / "notes.txt").write_text("not an image")
    monkeypatch.setattr("usp_fast.vae.load_vae", _no_vae)
    cfg = make_cfg(tmp_path, empty, tiny_vae_dir, stage="cache")
    with pytest.raises(SourceError, match="no images found") as e:
        check_data_source(cfg.data, need_images=True, vae_name=cfg.vae.name)
    assert str(empty / "train") in str(e.value)
    with pytest.raises(SourceError, match="no images found"):
        CacheStage(cfg).check_inputs()
    assert cache_status(cfg.data.cache_dir) == "missing"
