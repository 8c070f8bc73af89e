"""`data.source: online`: decode, crop and VAE-encode images while the model trains, instead of reading a cache.

The order is the same `StreamPlan` the cache path uses (each image once per epoch across ranks, reshuffled per
epoch); the crop window comes from (seed, epoch, index) and the flip from the plan, so a resumed run sees the
same pixels. A background thread keeps `data.prefetch` micro-batches decoded and encoded ahead of the step; on
GPU the encode runs on a side CUDA stream and the batch carries an event the training stream waits on.
Every file's header is probed once at start-up: undecodable files are logged by name and left out, so the
source's length (and the steps per epoch) counts decodable images only; with `data.fatal_bad_images` the first
one is an error instead. A file that passes the probe but fails to decode later (truncated data) is logged by name,
counted, and replaced by the next decodable image of the list (a deterministic choice, so batch sizes and resume
are unaffected), or is an error with `data.fatal_bad_images`.
With `data.randaug` set (fine-tuning), timm's RandAugment runs on each PIL crop in image space, before the VAE
encode, seeded per (seed, epoch, index) so resume stays exact; DALI has no such hook, so decoding falls back to PIL.
"""
import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import ConfigError, DataError
from ..seeding import randaug_seed, seeded_global_rngs
from .images import BadImage, draw_view, list_images, probe
from .pipeline import make_decoder

log = logging.getLogger(__name__)


class SeededRandAugment:
    """timm's RandAugment (which draws from the global RNGs) made a pure function of (seed, epoch, index)."""

    def __init__(self, config_str, size, seed):
        from timm.data import rand_augment_transform
        from timm.data.constants import IMAGENET_DEFAULT_MEAN

        hparams = {"translate_const": int(size * 0.45),  # timm's defaults for its ImageNet RandAugment
                   "img_mean": tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN)}
        if "mmax" not in config_str:  # at magnitude 10 (reachable with mstd) timm's increasing posterize asks for
            hparams["magnitude_max"] = 9.99  # 0 bits, which current Pillow rejects: stay just below it
        self.transform, self.seed = rand_augment_transform(config_str, hparams), seed

    def bind(self, epoch, index):
        return lambda image: self(image, epoch, index)

    def __call__(self, image, epoch, index):
        with seeded_global_rngs(randaug_seed(self.seed, epoch, index)):
            return self.transform(image)


class OnlineSource:
    def __init__(self, cfg, vae, device):
        self.cfg, self.vae, self.device = cfg, vae, torch.device(device)
        d = cfg.data
        if d.crop not in ("rrc", "center"):
            raise ConfigError(f"data.crop {d.crop!r}: expected rrc (RandomResizedCrop) or center (ADM centre crop)")
        if d.resolution % vae.downsample:
            raise ConfigError(f"data.resolution {d.resolution} is not a multiple of the VAE's downsampling "
                              f"{vae.downsample}")
        listed, self.classes = list_images(d.root, d.file_list)
        self.items, self.skipped = _decodable(listed, d)  # indices of the plan are indices of self.items
        self.randaug = SeededRandAugment(d.randaug, d.resolution, cfg.run.seed) if d.randaug else None
        decoder = d.decoder
        if self.randaug is not None and decoder != "pil":
            log.info("data.randaug is set: decoding with PIL (DALI has no image-space augmentation hook)")
            decoder = "pil"
        self.decoder = make_decoder(decoder, self.device, cfg.train.micro_batch, d.num_workers, d.max_pixels)
        self.bad = {}  # index -> error, for files found undecodable (deterministic: a property of the file)
        self.manifest = {
            "format": "online", "count": len(self.items), "num_images": len(listed), "skipped": self.skipped,
            "resolution": d.resolution, "crop": "rrc" if d.crop == "rrc" else "adm-center",
            "crop_scale": list(d.crop_scale), "flip": d.flip, "views": 1, "vae": vae.identity,
            "latent_channels": vae.latent_channels, "latent_size": d.resolution // vae.downsample,
            "num_classes": len(self.classes), "class_names": self.classes,
        }

    def __len__(self):
        return len(self.items)

    def _view_maker(self, index, epoch, flip):
        d = self.cfg.data
        augment = self.randaug.bind(epoch, index) if self.randaug is not None else None

        def make(w, h):
            view = draw_view(self.cfg.run.seed, epoch, index, w, h, d.resolution, d.crop, tuple(d.crop_scale), flip)
            view.augment = augment
            return view
        return make

    def images(self, indices, flips, epochs):
        """-> (images [B, 3, S, S] on the device, the indices actually used, labels). Undecodable files are
        replaced by the next decodable index, with that sample's epoch and flip."""
        used, pending = list(map(int, indices)), list(range(len(indices)))
        out = [None] * len(used)
        while pending:
            paths = [self.items[used[j]][0] for j in pending]
            makers = [self._view_maker(used[j], int(epochs[j]), bool(flips[j])) for j in pending]
            x, ok, errors = self.decoder.decode(paths, makers)
            good, retry = iter(x), []
            for j, o, err in zip(pending, ok, errors):
                if o:
                    out[j] = next(good)
                    continue
                if used[j] not in self.bad:
                    if self.cfg.data.fatal_bad_images:
                        raise DataError(f"bad image (data.fatal_bad_images is set): {err}")
                    self.bad[used[j]] = err
                    log.warning("skipping bad image (%d so far): %s", len(self.bad), err)
                    if len(self.bad) == len(self.items):
                        raise DataError(f"{_where(self.cfg.data)}: every image failed to decode (last: {err})")
                used[j] = self._next_good(used[j])
                retry.append(j)
            pending = retry
        labels = torch.tensor([self.items[i][1] for i in used], dtype=torch.int64)
        return torch.stack(out), torch.tensor(used, dtype=torch.int64), labels

    def _next_good(self, i):
        i = (i + 1) % len(self.items)
        while i in self.bad:
            i = (i + 1) % len(self.items)
        return i

    def stream(self, plan, start_step, total_steps):
        return OnlineStream(self, plan, start_step, total_steps)


def _where(d):
    return f"data.root {d.root}" if d.root is not None else f"data.file_list {d.file_list}"


def _probe_error(path, max_pixels):
    try:
        probe(path, max_pixels)
    except BadImage as e:
        return str(e)
    return None


def _decodable(items, d):
    """Probe each file's header once (threads; the result is a property of the file, so every rank agrees) ->
    (the decodable items in list order, [{"path", "error"}] of the others). DataError on the first bad file with
    data.fatal_bad_images, or when none is decodable."""
    t0 = time.time()
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1, len(items)))) as pool:
        errors = list(pool.map(lambda item: _probe_error(item[0], d.max_pixels), items))
    good = [item for item, err in zip(items, errors) if err is None]
    skipped = [{"path": item[0], "error": err} for item, err in zip(items, errors) if err is not None]
    if skipped and d.fatal_bad_images:
        raise DataError(f"bad image (data.fatal_bad_images is set): {skipped[0]['error']}")
    if not good:
        raise DataError(f"{_where(d)}: none of its {len(items)} images can be decoded (first: {skipped[0]['error']})")
    if skipped:
        log.warning("online source: %d of %d images skipped as unreadable (the epoch is the %d others):\n  %s%s",
                    len(skipped), len(items), len(good), "\n  ".join(s["error"] for s in skipped[:20]),
                    f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else "")
    log.info("online source: probed %d images in %.1fs, %d decodable", len(items), time.time() - t0, len(good))
    return good, skipped


class OnlineStream:
    """Iterates this rank's micro-batches {'mean', 'std', 'labels', 'indices'[, 'ready']} in order from
    `start_step`, produced `data.prefetch` ahead by a background thread."""

    def __init__(self, source, plan, start_step, total_steps):
        self.source, self.plan, self.start, self.total = source, plan, start_step, total_steps

    def _produce(self, out, stop):
        src = self.source
        cuda = src.device.type == "cuda"
        side = torch.cuda.Stream(src.device) if cuda else None
        try:
            for step in range(self.start, self.total):
                for m in range(self.plan.accum):
                    idx, flips, _, epochs = self.plan.micro_batch(step, m)
                    with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                        x, used, labels = src.images(idx, flips, epochs)
                        mean, std = src.vae.encode(x)
                        batch = {"mean": mean, "std": std, "labels": labels, "indices": used}
                        if cuda:  # the training stream must wait for the encode, and owns the memory after
                            batch["ready"] = torch.cuda.Event()
                            batch["ready"].record(side)
                    while not stop.is_set():
                        try:
                            out.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            out.put(e)

    def __iter__(self):
        out, stop = queue.Queue(maxsize=max(1, self.source.cfg.data.prefetch)), threading.Event()
        worker = threading.Thread(target=self._produce, args=(out, stop), name="online-data", daemon=True)
        worker.start()
        try:
            for _ in range((self.total - self.start) * self.plan.accum):
                batch = out.get()
                if isinstance(batch, BaseException):
                    raise batch
                if "ready" in batch:
                    stream = torch.cuda.current_stream(self.source.device)
                    for t in (batch["mean"], batch["std"]):
                        t.record_stream(stream)
                yield batch
        finally:  # the trainer stopped early (run_steps) or failed: end the producer
            stop.set()

