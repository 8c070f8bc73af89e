"""Getting a stage's data ready before it trains: the early source check, demo images, the latent cache."""
import logging

from .. import dist
from .cache import (build_cache, cache_status, check_cache_settings, check_labelled, default_cache_dir,
                    default_cache_dir_for, read_manifest)
from .demo import make_demo_imagefolder
from .images import SourceError, image_list_hash, list_images

log = logging.getLogger(__name__)


def check_data_source(data, need_images, vae_name=None, need_labels=False, labels_hint=""):
    """Fail fast, before any VAE or model loads, on a data source that cannot work: with `need_images` the image
    list must be non-empty (demo folders are made later, so they pass); else a complete latent cache must exist.
    With `need_labels` (a stage that trains on class labels) a flat image folder, or a cache built from one, is
    refused; `labels_hint` ends that message (e.g. the stage's label-free option)."""
    if data.demo_images:
        return
    if need_images:
        list_images(data.root, data.file_list, need_labels=need_labels, hint=labels_hint)
        return
    if data.root is None and data.file_list is None and data.cache_dir is None:
        raise SourceError("data: set data.cache_dir (a latent cache) or data.root / data.file_list (images)")
    cache_dir = default_cache_dir_for(data, vae_name)
    status = cache_status(cache_dir)
    if status != "complete":
        raise SourceError(f"latent cache {cache_dir} is {status}: build it with `usp-fast train --stage cache` and "
                          "the same config file and overrides, or set data.auto_cache=true")
    if need_labels:
        check_labelled(read_manifest(cache_dir), cache_dir, hint=labels_hint)


def check_labelled_cache(cache_dir, key):
    """A stage's held-out cache (finetune/probe.val_cache_dir), when already built, must have class labels."""
    if cache_dir and cache_status(cache_dir) == "complete":
        check_labelled(read_manifest(cache_dir), cache_dir, key)


def prepare_data(cfg, build_missing, reuse_complete=False):
    """Demo images if asked for, then the latent cache: built when `build_missing` (--stage cache, or a training
    stage with data.auto_cache); otherwise a training stage later refuses a missing or partial cache.
    With `build_missing`, a cache already there (complete or partial) must have been built with this config's
    settings, checked before the VAE loads: a complete one is reused, a mismatch raises CacheError saying what
    differs, and nothing already written is removed. `reuse_complete` (a training stage's data.auto_cache): a
    complete cache is used as it is; the Trainer checks that it fits (resolution, crop, VAE), while storage
    settings such as the shard size do not matter to training."""
    from ..vae import load_vae

    rank, world, device = dist.init()
    if cfg.data.demo_images:
        if rank == 0:
            make_demo_imagefolder(cfg.data.root, cfg.data.demo_images, seed=cfg.run.seed)
        dist.barrier()
    cache_dir = default_cache_dir(cfg)
    if not build_missing:
        return cache_dir
    status = cache_status(cache_dir)
    if status == "complete" and reuse_complete:
        return cache_dir
    if status != "missing" or (cache_dir / "build.json").exists():  # (build_cache checks the VAE's weights too)
        items, _ = list_images(cfg.data.root, cfg.data.file_list)
        manifest = check_cache_settings(cache_dir, cfg, image_list_hash(items), len(items))
        if status == "complete":
            if rank == 0:
                log.info("latent cache %s is complete and matches the config: reusing it (%d latents of %d images)",
                         cache_dir, manifest["count"], manifest["num_images"])
            return cache_dir
    vae = load_vae(cfg.vae.name, cfg.vae.scale, device=device)
    build_cache(cfg, vae, device, rank, world, barrier=dist.barrier)
    return cache_dir
