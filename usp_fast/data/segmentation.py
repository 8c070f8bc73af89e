"""Semantic-segmentation data in the ADE20K layout, the paired image/mask augmentation, and the two latent sources
of --stage segment (online encode, or a cache of fixed views).

Layout (ADEChallengeData2016):
    <root>/images/{training,validation}/<name>.jpg
    <root>/annotations/{training,validation}/<name>.png   one channel, 0 = ignored ("other"), classes 1..N
    <root>/classes.txt                                    optional: class k's name on line k (k = 1..N)
Masks are read as ADE's `reduce_zero_label`: 0 -> IGNORE (255), k -> k - 1, so the model predicts 0..N-1.

Training view (mmseg's ADE20K pipeline): resize keeping the aspect ratio so that the image fits `img_scale`
(long, short) times a ratio drawn from `ratio_range`; a random crop of crop x crop pixels, redrawn up to 10 times
while one class covers more than `cat_max_ratio` of it; a horizontal flip with probability 1/2; padding to the
crop size (image 0, mask IGNORE). The image is resized bilinearly, the mask only ever with nearest-neighbour, and
both see the same window and flip. Every draw comes from (seed, epoch, image index), so a resumed run sees the same
pixels. mmseg's PhotoMetricDistortion is not applied (colour jitter would change what the frozen VAE encodes).
"""
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..io import atomic_write_text
from ..seeding import SEG_VIEW_SALT
from .images import IMAGE_EXTENSIONS, BadImage, load_rgb, to_tensor

log = logging.getLogger(__name__)

IGNORE = 255  # the ignored label after reduce_zero_label (ADE's 0, "other")
SPLITS = ("training", "validation")
CACHE_FORMAT = "usp-fast-segment-views/1"


class SegmentDataError(DataError):
    pass


# ---- the folder ----
def list_pairs(root, split):
    """-> [(image path, mask path)] of `split`, sorted by name. One-line errors for a missing folder and for an
    image without its mask."""
    root = Path(root)
    images, masks = root / "images" / split, root / "annotations" / split
    for folder in (images, masks):
        if not folder.is_dir():
            raise SegmentDataError(f"data.root {root}: {folder} is missing (expected the ADE20K layout "
                                   f"images/{{training,validation}}/*.jpg + annotations/{{training,validation}}/*.png)")
    pics = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not pics:
        raise SegmentDataError(f"data.root {root}: no images in {images}")
    pairs = []
    for p in pics:
        m = masks / f"{p.stem}.png"
        if not m.is_file():
            raise SegmentDataError(f"{p}: no mask {m} (every image needs annotations/{split}/<name>.png)")
        pairs.append((str(p), str(m)))
    return pairs


def class_names(root, num_classes):
    """The class names from <root>/classes.txt (one per line), else '1'..'N'. num_classes 0: as many as listed."""
    path = Path(root) / "classes.txt"
    names = [n.strip() for n in path.read_text().splitlines() if n.strip()] if path.is_file() else []
    if num_classes == 0:
        if not names:
            raise SegmentDataError(f"segment.num_classes is 0 (read from the data) but {path} does not exist: set "
                                   "segment.num_classes (ADE20K: 150) or write one class name per line there")
        return names
    if names and len(names) != num_classes:
        raise SegmentDataError(f"{path} names {len(names)} classes, segment.num_classes is {num_classes}")
    return names or [str(k) for k in range(1, num_classes + 1)]


def load_mask(path, num_classes):
    """A mask PNG -> uint8 [H, W] with reduce_zero_label applied (0 -> IGNORE, k -> k - 1). One-line errors for
    an unreadable or multi-channel file and for values above num_classes."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise SegmentDataError(f"{path}: a {im.mode} image; a mask holds one class index per pixel "
                                       "(8-bit grey or palette PNG)")
            arr = np.asarray(im)
    except SegmentDataError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise SegmentDataError(f"{path}: cannot decode the mask ({type(e).__name__}: {e})") from None
    top = int(arr.max()) if arr.size else 0
    if top > num_classes:
        raise SegmentDataError(f"{path}: mask value {top} is above segment.num_classes {num_classes} (labels are 0 "
                               "= ignored, 1..num_classes)")
    out = arr.astype(np.int16) - 1
    out[out < 0] = IGNORE
    return out.astype(np.uint8)


def load_pair(image_path, mask_path, num_classes, max_pixels):
    try:
        image = load_rgb(image_path, max_pixels)
    except BadImage as e:
        raise SegmentDataError(str(e)) from None
    mask = load_mask(mask_path, num_classes)
    if mask.shape != (image.size[1], image.size[0]):
        raise SegmentDataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} "
                               f"{image.size[0]}x{image.size[1]}")
    return image, mask


# ---- the paired view ----
def scaled_size(width, height, img_scale, ratio=1.0):
    """mmseg's keep-ratio Resize: the largest size fitting (long, short) = img_scale x ratio -> (w, h)."""
    long_side, short_side = img_scale[0] * ratio, img_scale[1] * ratio
    scale = min(long_side / max(width, height), short_side / min(width, height))
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def view_rng(seed, epoch, index):
    return np.random.default_rng([seed, epoch, index, SEG_VIEW_SALT])


def paired_view(image, mask, rng, crop, img_scale, ratio_range, cat_max_ratio=0.75, flip=True):
    """PIL image + uint8 mask -> (uint8 [crop, crop, 3], uint8 [crop, crop]): resize, crop, flip, pad, the same
    geometry for both (bilinear for the image, nearest for the mask)."""
    w, h = image.size
    ratio = rng.uniform(*ratio_range)
    nw, nh = scaled_size(w, h, img_scale, ratio)
    img = np.asarray(image.resize((nw, nh), Image.BILINEAR))
    m = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
    mh, mw = max(nh - crop, 0), max(nw - crop, 0)
    for _ in range(10):  # mmseg RandomCrop: retry while one class covers more than cat_max_ratio
        top, left = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
        win = m[top:top + crop, left:left + crop]
        labels, counts = np.unique(win[win != IGNORE], return_counts=True)
        if cat_max_ratio >= 1.0 or (len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio):
            break
    img, m = img[top:top + crop, left:left + crop], m[top:top + crop, left:left + crop]
    if flip and rng.integers(0, 2):
        img, m = img[:, ::-1], m[:, ::-1]
    out_img = np.zeros((crop, crop, 3), dtype=np.uint8)
    out_mask = np.full((crop, crop), IGNORE, dtype=np.uint8)
    out_img[:img.shape[0], :img.shape[1]] = img
    out_mask[:m.shape[0], :m.shape[1]] = m
    return out_img, out_mask


class ViewSpec:
    """What a training view needs from the config (segment and data groups)."""

    def __init__(self, cfg):
        s, d = cfg.segment, cfg.data
        self.crop, self.img_scale, self.ratio_range = d.resolution, tuple(s.img_scale), tuple(s.ratio_range)
        self.cat_max_ratio, self.flip, self.seed, self.max_pixels = s.cat_max_ratio, d.flip, cfg.run.seed, d.max_pixels

    def as_dict(self):
        return {"crop": self.crop, "img_scale": list(self.img_scale), "ratio_range": list(self.ratio_range),
                "cat_max_ratio": self.cat_max_ratio, "flip": self.flip}

    def make(self, pair, num_classes, seed, epoch, index):
        image, mask = load_pair(*pair, num_classes, self.max_pixels)
        return paired_view(image, mask, view_rng(seed, epoch, index), self.crop, self.img_scale, self.ratio_range,
                           self.cat_max_ratio, self.flip)


def _manifest(cfg, vae, pairs, names, fmt, views):
    return {"format": fmt, "count": len(pairs), "num_images": len(pairs), "resolution": cfg.data.resolution,
            "views": views, "vae": vae.identity, "latent_channels": vae.latent_channels,
            "latent_size": cfg.data.resolution // vae.downsample, "downsample": vae.downsample,
            "num_classes": len(names), "class_names": names, "root": str(cfg.data.root)}


class SegOnlineSource:
    """Decode, paired-augment and VAE-encode each micro-batch while the model trains (usp_fast.data.online's
    OnlineStream drives it: it reads `images()`, `vae`, `device` and `cfg`). Batches carry the masks as 'labels'."""

    def __init__(self, cfg, vae, device, pairs, names):
        self.cfg, self.vae, self.device, self.pairs = cfg, vae, torch.device(device), pairs
        self.spec, self.num_classes = ViewSpec(cfg), len(names)
        self.pool = ThreadPoolExecutor(max(1, cfg.data.num_workers))
        self.manifest = _manifest(cfg, vae, pairs, names, "segment-online", 1)

    def __len__(self):
        return len(self.pairs)

    def images(self, indices, flips, epochs):
        """-> (images [B, 3, S, S] in [-1, 1] on the device, indices, masks [B, S, S] int64)."""
        jobs = [self.pool.submit(self.spec.make, self.pairs[int(i)], self.num_classes, self.spec.seed, int(e), int(i))
                for i, e in zip(indices, epochs)]
        views = [j.result() for j in jobs]
        x = torch.stack([to_tensor(v[0]) for v in views]).to(self.device)
        masks = torch.from_numpy(np.stack([v[1] for v in views])).long()
        return x, torch.as_tensor(np.asarray(indices), dtype=torch.int64), masks

    def stream(self, plan, start_step, total_steps):
        from .online import OnlineStream

        return OnlineStream(self, plan, start_step, total_steps)


class SegViewCache:
    """segment.views = V > 0: V fixed training views per image (drawn with seed 0 and the view number as the epoch,
    so every run seed shares them), their latents and masks in two .npy files; the stream picks one view per image
    per epoch (the engine's StreamPlan, from run.seed). `read` has the LatentCache interface (CacheStream)."""

    def __init__(self, folder, manifest):
        self.dir, self.manifest, self._arrays = Path(folder), manifest, None

    def __len__(self):
        return self.manifest["count"]

    def read(self, indices, flips, views=None):
        if self._arrays is None:  # opened lazily, so each loader worker maps the files itself
            self._arrays = (np.load(self.dir / "latents.npy", mmap_mode="r"), np.load(self.dir / "masks.npy", mmap_mode="r"))
        lat, masks = self._arrays
        views = np.zeros(len(indices), dtype=np.int64) if views is None else views
        mean = np.stack([lat[int(i), int(v)] for i, v in zip(indices, views)]).astype(np.float32)
        m = np.stack([masks[int(i), int(v)] for i, v in zip(indices, views)]).astype(np.int64)
        return mean, np.zeros_like(mean), m


def _settings(cfg, vae, pairs, num_classes):
    import hashlib

    h = hashlib.sha256("".join(f"{Path(a).name}\t{Path(b).name}\n" for a, b in pairs).encode()).hexdigest()
    return {"format": CACHE_FORMAT, "root": str(Path(cfg.data.root).resolve()), "pairs": h, "count": len(pairs),
            "views": cfg.segment.views, "num_classes": num_classes, "view": ViewSpec(cfg).as_dict(),
            "vae": {k: vae.identity.get(k) for k in ("name", "fingerprint", "scale")}}


def open_view_cache(cfg, vae, device, pairs, names, folder):
    """The view cache at `folder`: reused when its settings match this config, built (rank 0 only: callers
    barrier) when missing; a cache made with other settings is an error naming what differs."""
    folder = Path(folder)
    want = _settings(cfg, vae, pairs, len(names))
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        diff = [k for k in want if manifest.get("settings", {}).get(k) != want[k]]
        if diff:
            raise SegmentDataError(f"segment.cache_dir {folder} was built with other settings ({', '.join(diff)} "
                                   "differ): delete it or choose another segment.cache_dir")
        return SegViewCache(folder, manifest), manifest
    return None, want


def build_view_cache(cfg, vae, device, pairs, names, folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    want = _settings(cfg, vae, pairs, len(names))
    spec, V, S, n = ViewSpec(cfg), cfg.segment.views, cfg.data.resolution, len(pairs)
    ls = S // vae.downsample
    t0 = time.time()
    lat_tmp, mask_tmp = folder / ".latents.npy.tmp.npy", folder / ".masks.npy.tmp.npy"
    lat = np.lib.format.open_memmap(lat_tmp, "w+", np.float16, (n, V, vae.latent_channels, ls, ls))
    masks = np.lib.format.open_memmap(mask_tmp, "w+", np.uint8, (n, V, S, S))
    s1 = np.zeros(vae.latent_channels)
    s2 = np.zeros(vae.latent_channels)
    jobs = [(i, v) for i in range(n) for v in range(V)]
    batch = max(1, cfg.vae.encode_batch)
    with ThreadPoolExecutor(max(1, cfg.data.num_workers)) as pool:
        for k in range(0, len(jobs), batch):
            chunk = jobs[k:k + batch]
            views = list(pool.map(lambda iv: spec.make(pairs[iv[0]], len(names), 0, iv[1], iv[0]), chunk))
            x = torch.stack([to_tensor(im) for im, _ in views]).to(device)
            mean, _ = vae.encode(x)
            mean = mean.float().cpu().numpy()
            for (i, v), z, (_, m) in zip(chunk, mean, views):
                lat[i, v], masks[i, v] = z, m
            s1 += mean.sum((0, 2, 3))
            s2 += (mean.astype(np.float64) ** 2).sum((0, 2, 3))
    lat.flush()
    masks.flush()
    del lat, masks
    os.replace(lat_tmp, folder / "latents.npy")
    os.replace(mask_tmp, folder / "masks.npy")
    count = len(jobs) * ls * ls
    mu = s1 / count
    manifest = {**_manifest(cfg, vae, pairs, names, CACHE_FORMAT, V), "settings": want,
                "latent_mean": mu.tolist(), "latent_std": np.sqrt(np.maximum(s2 / count - mu ** 2, 1e-12)).tolist()}
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))  # last: the cache is complete
    log.info("segment view cache %s: %d images x %d views encoded in %.0fs", folder, n, V, time.time() - t0)
    return SegViewCache(folder, manifest), manifest


# ---- evaluation images ----
def eval_pair(pair, num_classes, img_scale, multiple, max_pixels):
    """A validation image and its mask -> (image [1, 3, h, w] in [-1, 1] resized to the test scale and padded to
    a multiple of `multiple` pixels, (h, w) before padding, uint8 image at the original size, mask at the
    original size). The mask is never resized: predictions are resized to it."""
    image, mask = load_pair(*pair, num_classes, max_pixels)
    w, h = scaled_size(*image.size, img_scale)
    arr = np.asarray(image.resize((w, h), Image.BILINEAR))
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    padded = np.zeros((ph, pw, 3), dtype=np.uint8)
    padded[:h, :w] = arr
    return to_tensor(padded)[None], (h, w), np.asarray(image), mask

