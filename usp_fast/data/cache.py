"""The latent cache: VAE posteriors of cropped images and their horizontal flips, in large shards.

Layout of a cache directory:
  shard_00000.npy   float16 [n, 2 (mean, std), V (views), 2 (plain, flipped), C, h, w]  (memory-mapped in training)
                    view 0 is the ADM centre crop; views 1..cache.views are RandomResizedCrops drawn from
                    (seed, view, image index), so the cached path keeps crop augmentation
  shard_00000.json  {"indices": image indices stored, "labels": [...], "skipped": [{"path", "error"}],
                     "stats": per-channel count, sums of the posterior means and their squares, and sums of
                     the posterior variances, over every stored view (the latents that train)}
  build.json        written first: the settings the shards are built with; a later build into the folder
                    (resumed or repeated) must match them, and the manifest (see `check_cache_settings`)
  manifest.json     written last, once every shard exists: what was encoded and how (see `expected_fields`),
                    with the per-channel latent mean/std (useful for VAEs whose latents are not ~unit scale)
A shard is finished when its .json exists (it is written after the .npy, both atomically), so an interrupted
build resumes by skipping finished shards. Rank r of W builds shards r, r+W, ...; rank 0 writes the manifest.
"""
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_path, atomic_write_text
from ..progress import progress_bar
from .images import LABELS_HINT, draw_view, image_list_hash, is_flat_folder, list_images
from .pipeline import make_decoder

log = logging.getLogger(__name__)

FORMAT = "usp-fast-latents/3"  # 3: statistics over every view, with posterior variances
CROP_POLICY = "adm-center"


class CacheError(DataError, RuntimeError):
    pass


def default_cache_dir(cfg):
    return default_cache_dir_for(cfg.data, cfg.vae.name)


def default_cache_dir_for(data, vae_name=None):
    """data.cache_dir, else <root or file list>/../latents_<resolution>_<vae tag>."""
    if data.cache_dir:
        return Path(data.cache_dir)
    if vae_name is None:
        raise CacheError("data.cache_dir is unset and no VAE name was given to derive it")
    src = Path(data.root or data.file_list)
    tag = Path(str(vae_name)).name.replace("/", "_").replace(":", "")  # pixels:4 -> pixels4 (portable names)
    return src.parent / f"latents_{data.resolution}_{tag}"


def expected_fields(cfg):
    """What a training config requires of a cache's manifest."""
    return {"format": FORMAT, "resolution": cfg.data.resolution, "crop": CROP_POLICY,
            "vae.name": str(cfg.vae.name), "vae.scale": float(cfg.vae.scale)}


def _shard_paths(cache_dir, i):
    return cache_dir / f"shard_{i:05d}.npy", cache_dir / f"shard_{i:05d}.json"


def build_cache(cfg, vae, device, rank=0, world_size=1, barrier=None):
    """Encode every image of cfg.data (and its flip) into the cache; resumable and shardable across ranks."""
    cache_dir = default_cache_dir(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    items, classes = list_images(cfg.data.root, cfg.data.file_list)
    shard_size, res = cfg.cache.shard_size, cfg.data.resolution
    num_shards = (len(items) + shard_size - 1) // shard_size
    list_hash = image_list_hash(items)
    _check_build_target(cache_dir, cfg, vae, list_hash, len(items))
    mine = [i for i in range(num_shards) if i % world_size == rank and not _shard_paths(cache_dir, i)[1].exists()]
    todo = sum(min(shard_size, len(items) - i * shard_size) for i in mine)
    log.info("cache %s: %d images in %d shards; rank %d builds %d shards (%d images), %d already done",
             cache_dir, len(items), num_shards, rank, len(mine), todo, num_shards - len(mine) * world_size)
    dtype = np.dtype(cfg.cache.dtype)
    decoder = make_decoder(cfg.data.decoder, device, cfg.vae.encode_batch, cfg.data.num_workers, cfg.data.max_pixels)
    bar = progress_bar(total=todo, desc=f"cache r{rank}", unit="img", disable=rank != 0)
    start = time.time()
    for shard in mine:
        lo, hi = shard * shard_size, min((shard + 1) * shard_size, len(items))
        t0 = time.time()
        _build_shard(cache_dir, shard, items, lo, hi, res, vae, decoder, dtype, cfg, bar)
        log.info("rank %d: shard %d (%d images) in %.1fs, %.1f img/s (%s decoder)", rank, shard, hi - lo,
                 time.time() - t0, (hi - lo) / max(time.time() - t0, 1e-9), decoder.name)
    bar.close()
    if todo:
        log.info("rank %d encoded %d images in %.1fs (%.1f img/s)", rank, todo, time.time() - start,
                 todo / max(time.time() - start, 1e-9))
    if barrier is not None:
        barrier()
    if rank == 0:
        _write_manifest(cache_dir, cfg, vae, items, classes, num_shards, list_hash)
    if barrier is not None:
        barrier()
    return cache_dir


def _check_build_target(cache_dir, cfg, vae, list_hash, count):
    """Never mix two different caches in one directory: a cache there (complete, or partial with its build.json)
    must have been built with this config's settings; a new build records them in build.json first."""
    check_cache_settings(cache_dir, cfg, list_hash, count, vae.identity)
    meta_path = cache_dir / "build.json"
    if not meta_path.exists():
        meta = {"format": FORMAT, "resolution": cfg.data.resolution, "crop": CROP_POLICY, "vae": vae.identity,
                "image_list_sha256": list_hash, "num_images": count, "shard_size": cfg.cache.shard_size,
                "dtype": cfg.cache.dtype, "views": 1 + cfg.cache.views, "crop_scale": list(cfg.data.crop_scale),
                "seed": cfg.run.seed}
        try:
            atomic_write_text(meta_path, json.dumps(meta, indent=2))
        except FileExistsError:
            pass


def check_cache_settings(cache_dir, cfg, list_hash=None, num_images=None, vae_identity=None):
    """Compare what a cache directory records (manifest.json, else build.json) with what `cfg` would build; raise
    CacheError listing every differing field as `key: cache has X, config gives Y`. The image list and the VAE's
    weights are compared only when given (`list_hash`/`num_images`, `vae_identity`). -> the manifest of a
    complete cache, else None (nothing there, or a partial build that matches). Reads only: nothing is removed."""
    cache_dir = Path(cache_dir)
    manifest_path, build_path = cache_dir / "manifest.json", cache_dir / "build.json"
    record = {}
    if build_path.exists():
        record.update(_read_json(build_path, "choose another data.cache_dir, or delete the folder to rebuild"))
    if manifest_path.exists():  # the manifest wins where both record a field
        record.update(read_manifest(cache_dir))
    if not record:
        if cache_dir.is_dir() and any(cache_dir.glob("shard_*")):
            raise CacheError(f"{cache_dir} holds cache shards but no build.json or manifest.json saying how they "
                             "were built; choose another data.cache_dir or delete it")
        return None
    views = 1 + cfg.cache.views
    want = {"format": FORMAT, "data.resolution": cfg.data.resolution, "crop": CROP_POLICY,
            "cache.views": cfg.cache.views, "cache.dtype": cfg.cache.dtype, "cache.shard_size": cfg.cache.shard_size,
            "vae.name": str(cfg.vae.name), "vae.scale": float(cfg.vae.scale)}
    vae = record.get("vae") or {}
    have = {"format": record.get("format"), "data.resolution": record.get("resolution"), "crop": record.get("crop"),
            "cache.views": record["views"] - 1 if isinstance(record.get("views"), int) else None,
            "cache.dtype": record.get("dtype"), "cache.shard_size": record.get("shard_size"),
            "vae.name": vae.get("name"), "vae.scale": vae.get("scale")}
    if views > 1:  # the extra views are RandomResizedCrops drawn from (run.seed, view, index) within crop_scale
        want.update({"data.crop_scale": list(cfg.data.crop_scale), "run.seed": cfg.run.seed})
        have.update({"data.crop_scale": record.get("crop_scale"), "run.seed": record.get("seed")})
    if vae_identity is not None:
        want["vae.fingerprint"], have["vae.fingerprint"] = vae_identity.get("fingerprint"), vae.get("fingerprint")
    if list_hash is not None:
        want["image list (sha256)"], have["image list (sha256)"] = list_hash, record.get("image_list_sha256")
    if num_images is not None:
        want["image count"], have["image count"] = num_images, record.get("num_images")
    diff = [f"{k}: cache has {_show(have[k])}, config gives {_show(v)}" for k, v in want.items()
            if have[k] is not None and have[k] != v]  # a field an older cache did not record is not compared
    state = "complete" if manifest_path.exists() else "partial"
    if diff:
        raise CacheError(f"{cache_dir} holds a different cache ({state}): {'; '.join(diff)}. Nothing was changed: "
                         "choose another data.cache_dir, or delete it to rebuild")
    return read_manifest(cache_dir) if state == "complete" else None


def _read_json(path, fix):
    """A JSON record of the cache; a damaged one (a torn write, a disk error) -> CacheError naming it and `fix`."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise CacheError(f"{path}: damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {fix}") from None
    if not isinstance(value, dict):
        raise CacheError(f"{path}: damaged (a JSON {type(value).__name__}, expected an object); {fix}")
    return value


REBUILD = "run `usp-fast train --stage cache` with the same config"


def read_manifest(cache_dir):
    """<cache_dir>/manifest.json; a damaged one -> CacheError saying how to rewrite it (from the finished shards)."""
    return _read_json(Path(cache_dir) / "manifest.json", f"delete it and {REBUILD} to rewrite it from the finished "
                                                         "shards")


def _shard_fix(npy):
    return (f"delete {npy.name}, {npy.with_suffix('.json').name} and manifest.json, then {REBUILD} to re-encode "
            "that shard")


def _show(v):
    return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)


def _shard_views(cfg, res):
    """-> one view maker per stored view: maker(index) -> (width, height) -> View (flip is done on the tensor)."""
    makers = [lambda i: lambda w, h: draw_view(0, 0, i, w, h, res, crop="center", flip=False)]
    for k in range(1, 1 + cfg.cache.views):
        makers.append(lambda i, k=k: lambda w, h: draw_view(cfg.run.seed, k, i, w, h, res, "rrc",
                                                             tuple(cfg.data.crop_scale), flip=False))
    return makers


def _build_shard(cache_dir, shard, items, lo, hi, res, vae, decoder, dtype, cfg, bar):
    C, h, V = vae.latent_channels, res // vae.downsample, 1 + cfg.cache.views
    out = np.empty((hi - lo, 2, V, 2, C, h, h), dtype=dtype)
    kept, labels, skipped = [], [], []
    stats = np.zeros((4, C))  # per channel: count, sum, sum of squares of the means, sum of variances (float64)
    makers = _shard_views(cfg, res)
    for b0 in range(lo, hi, cfg.vae.encode_batch):
        batch = list(range(b0, min(b0 + cfg.vae.encode_batch, hi)))
        paths = [items[i][0] for i in batch]
        views, good = [], [True] * len(batch)
        for make in makers:  # a file that fails one view fails them all: it is skipped once
            x, ok, errors = decoder.decode(paths, [make(i) for i in batch])
            views.append((x, ok))
            for j, err in enumerate(errors):
                if err is not None and good[j]:
                    good[j] = False
                    if cfg.data.fatal_bad_images:
                        raise CacheError(f"bad image (data.fatal_bad_images is set): {err}")
                    log.warning("skipping bad image: %s", err)
                    skipped.append({"path": paths[j], "error": err})
        n = sum(good)
        if n:
            row = slice(len(kept), len(kept) + n)
            for v, (x, ok) in enumerate(views):
                keep = torch.tensor([g for g, o in zip(good, ok) if o], device=x.device)  # rows decoded in all views
                x = x[keep]
                mean, std = vae.encode(torch.cat([x, x.flip(-1)]))
                out[row, 0, v] = torch.stack([mean[:n], mean[n:]], 1).float().cpu().numpy().astype(dtype)
                out[row, 1, v] = torch.stack([std[:n], std[n:]], 1).float().cpu().numpy().astype(dtype)
                # every view trains (a flip leaves per-channel statistics unchanged), so every view counts
                m, var = mean[:n].double(), std[:n].double().pow(2)
                stats += torch.stack([torch.full((C,), m[:, 0].numel(), dtype=torch.float64, device=m.device),
                                      m.sum((0, 2, 3)), m.pow(2).sum((0, 2, 3)), var.sum((0, 2, 3))]).cpu().numpy()
            kept += [i for i, g in zip(batch, good) if g]
            labels += [int(items[i][1]) for i, g in zip(batch, good) if g]
        bar.update(len(batch))
    npy, js = _shard_paths(cache_dir, shard)
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, out[: len(kept)])
    atomic_write_text(js, json.dumps({"indices": kept, "labels": labels, "skipped": skipped,
                                      "stats": stats.tolist()}))


def latent_stats(stats):
    """Summed (count, sum, sum of squares, sum of posterior variances) per channel -> (mean, std of the posterior
    means, mean posterior variance) lists."""
    count, s1, s2, sv = np.asarray(stats)
    count = np.maximum(count, 1)
    mean = s1 / count
    return mean.tolist(), np.sqrt(np.maximum(s2 / count - mean ** 2, 0)).tolist(), (sv / count).tolist()


def _write_manifest(cache_dir, cfg, vae, items, classes, num_shards, list_hash):
    shards, count, skipped, stats = [], 0, [], 0
    for i in range(num_shards):
        npy, js = _shard_paths(cache_dir, i)
        if not js.exists():
            raise CacheError(f"{cache_dir}: shard {i} is missing after the build; run --stage cache again")
        meta = _read_json(js, _shard_fix(npy))
        shards.append({"file": npy.name, "count": len(meta["indices"])})
        count += len(meta["indices"])
        skipped += meta["skipped"]
        stats = stats + np.asarray(meta["stats"])
    if count == 0:
        raise CacheError(f"{cache_dir}: every image failed to decode ({len(skipped)} skipped)")
    res = cfg.data.resolution
    mean, std, posterior_var = latent_stats(stats)
    manifest = {
        "format": FORMAT, "count": count, "num_images": len(items), "skipped": skipped,
        "layout": "[n, (mean, std), view, (plain, flipped), C, h, w]", "dtype": cfg.cache.dtype,
        "latent_channels": vae.latent_channels, "latent_size": res // vae.downsample, "resolution": res,
        "crop": CROP_POLICY, "flip": True, "views": 1 + cfg.cache.views, "crop_scale": list(cfg.data.crop_scale),
        "vae": vae.identity, "image_list_sha256": list_hash, "latent_mean": mean, "latent_std": std,
        "latent_posterior_var": posterior_var, "latent_stats_over": f"{1 + cfg.cache.views} views",
        "num_classes": len(classes), "class_names": classes, "shards": shards,
        # false: a flat folder of images (no class subfolders), every label 0: fine for pretraining and
        # unconditional generation, refused by stages that need labels (check_labelled)
        "labelled": cfg.data.file_list is not None or not is_flat_folder(cfg.data.root),
    }
    atomic_write_text(cache_dir / "manifest.json", json.dumps(manifest, indent=1))
    if not manifest["labelled"]:
        log.warning("cache: %s has no class subfolders: every label is 0 (fine for pretraining and unconditional "
                    "generation; stages that need labels refuse this cache)", cfg.data.root)
    if skipped:
        log.warning("cache: %d of %d images skipped as unreadable (listed in manifest.json 'skipped'):\n  %s",
                    len(skipped), len(items), "\n  ".join(s["error"] for s in skipped[:20]))
    log.info("cache ready: %s (%d latents of %d images); latent std per channel %.3g..%.3g (mean %.3g)",
             cache_dir, count, len(items), min(std), max(std), float(np.mean(std)))
    if not 0.5 < float(np.mean(std)) < 2:
        log.warning("latents are far from unit scale (mean channel std %.3g): consider vae.scale=%.4g",
                    float(np.mean(std)), cfg.vae.scale / float(np.mean(std)))


def cache_status(cache_dir):
    """'missing' (nothing there), 'partial' (shards without a manifest) or 'complete'."""
    cache_dir = Path(cache_dir)
    if (cache_dir / "manifest.json").exists():
        return "complete"
    return "partial" if cache_dir.is_dir() and any(cache_dir.glob("shard_*")) else "missing"


def check_manifest(cache_dir, cfg):
    """Load the manifest and refuse a partial or mismatched cache with a message that says what differs."""
    cache_dir = Path(cache_dir)
    status = cache_status(cache_dir)
    if status == "missing":
        raise CacheError(f"no latent cache at {cache_dir}: build it with `usp-fast train --stage cache` and the same "
                         "config file and overrides")
    if status == "partial":
        done = len(list(cache_dir.glob("shard_*.json")))
        raise CacheError(f"latent cache {cache_dir} is partial ({done} shards, no manifest): an interrupted "
                         "build; run `usp-fast train --stage cache` with the same config file and overrides to "
                         "finish it")
    manifest = read_manifest(cache_dir)
    got = {"format": manifest.get("format"), "resolution": manifest.get("resolution"), "crop": manifest.get("crop"),
           "vae.name": manifest.get("vae", {}).get("name"), "vae.scale": manifest.get("vae", {}).get("scale")}
    diff = [f"{k}: cache has {got[k]!r}, config expects {v!r}" for k, v in expected_fields(cfg).items() if got[k] != v]
    if diff:
        raise CacheError(f"latent cache {cache_dir} does not match the config: " + "; ".join(diff))
    for s in manifest["shards"]:
        if not (cache_dir / s["file"]).exists():
            raise CacheError(f"latent cache {cache_dir}: shard file {s['file']} listed in the manifest is missing")
        _open_shard(cache_dir / s["file"], s["count"])  # a truncated or replaced shard fails here, not in a worker
    return manifest


def _open_shard(npy, count=None):
    """Memory-map a shard; a truncated, foreign or short one -> CacheError naming it and how to rebuild it."""
    try:
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # a truncated file: "mmap length is greater than file size"
        raise CacheError(f"{npy}: damaged shard ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"{_shard_fix(npy)}") from None
    if array.ndim != 7 or (count is not None and array.shape[0] != count):
        raise CacheError(f"{npy}: damaged shard (shape {list(array.shape)}, the manifest lists {count} latents); "
                         f"{_shard_fix(npy)}")
    return array


def check_labelled(manifest, cache_dir, key="data.cache_dir", hint=""):
    """Refuse a cache whose labels are all 0 because it was built from a flat folder (manifest 'labelled' false;
    caches from before the field are taken as labelled) where a stage needs class labels."""
    if manifest.get("labelled") is False:
        raise CacheError(f"{key}: latent cache {cache_dir} was built from a folder with no class subfolders, so "
                         f"every label in it is 0, and this stage needs class labels: {LABELS_HINT}, then build "
                         f"a new cache with `usp-fast train --stage cache` (delete this one or choose another "
                         f"cache folder){hint}")
    return manifest


class LatentCache:
    """Memory-mapped view of a finished cache: `read(indices, flips, views)` -> (mean, std, labels) arrays."""

    def __init__(self, cache_dir, manifest):
        self.dir, self.manifest = Path(cache_dir), manifest
        self._arrays = None  # opened lazily, so each DataLoader worker maps the files itself
        labels, owner, row = [], [], []
        for s_idx, s in enumerate(manifest["shards"]):
            npy = self.dir / s["file"]
            meta = _read_json(npy.with_suffix(".json"), _shard_fix(npy))
            labels += meta["labels"]
            owner += [s_idx] * s["count"]
            row += list(range(s["count"]))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.owner, self.row = np.asarray(owner), np.asarray(row)

    def __len__(self):
        return len(self.labels)

    @property
    def views(self):
        return self.manifest.get("views", 1)

    def read(self, indices, flips, views=None):
        if self._arrays is None:
            self._arrays = [_open_shard(self.dir / s["file"]) for s in self.manifest["shards"]]
        first = self._arrays[0]
        views = np.zeros(len(indices), dtype=np.int64) if views is None else views
        out = np.empty((len(indices), 2) + first.shape[4:], dtype=first.dtype)
        for j, (i, f, v) in enumerate(zip(indices, flips, views)):
            out[j] = self._arrays[self.owner[i]][self.row[i], :, int(v), int(f)]
        return out[:, 0], out[:, 1], self.labels[indices]


def open_cache(cache_dir, cfg):
    """A finished latent cache that matches `cfg` (checked by check_manifest) -> (LatentCache, manifest)."""
    manifest = check_manifest(cache_dir, cfg)
    return LatentCache(cache_dir, manifest), manifest
