"""Image decoders: files + `View`s -> a batch [n, 3, S, S] in [-1, 1] on the device the VAE runs on.

Two interchangeable back ends give the same pixels for the same views (within resize-filter tolerance: a mean
of ~0.2 8-bit levels; for ADM centre crops of images whose short side is >= 2x the output size, which ADM
BOX-halves first, DALI resizes in one antialiased bicubic step and differs by a few levels):
  - `DALIDecoder`: NVIDIA DALI; JPEG decode `mixed` (nvJPEG, output stays on the GPU, no host round-trip) when
    the device is CUDA, `cpu` otherwise; ROI decode of the crop window, antialiased resize, mirror and
    normalisation to CHW in one pipeline. Optional: only imported when used.
  - `PILDecoder`: Pillow in a thread pool of N workers (Pillow releases the GIL while decoding and resizing).
Both never raise on bad input: a sample that cannot be decoded comes back as an error string naming the file.
DALI gets only files it can decode safely (plain RGB/grayscale JPEG ending in an EOI marker, PNG); anything
else (CMYK, truncated, other formats) goes through the PIL fallback, and a batch DALI rejects is redone by PIL.
"""
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .images import MAX_PIXELS, BadImage, adm_window, apply_view, load_rgb, probe, to_tensor

log = logging.getLogger(__name__)


def dali_available():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def make_decoder(kind, device, batch_size, num_workers=2, max_pixels=MAX_PIXELS):
    """kind: 'auto' (DALI on a CUDA device when installed, else PIL: on CPU the VAE encode, not decoding, bounds
    throughput (see `benchmarks/data_suite.py`), and PIL is the exact ADM reference), 'dali' or 'pil'."""
    if kind not in ("auto", "dali", "pil"):
        raise ValueError(f"data.decoder {kind!r}: expected auto, dali or pil")
    device = torch.device(device)
    if kind == "dali" or (kind == "auto" and device.type == "cuda" and dali_available()):
        if not dali_available():
            raise ImportError("data.decoder=dali but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        return DALIDecoder(device, batch_size, num_workers, max_pixels)
    return PILDecoder(device, num_workers, max_pixels)


def _check_sizes(views):
    sizes = {v.size for v in views}
    if len(sizes) != 1:
        raise ValueError(f"one batch must have one output size, got {sorted(sizes)}")
    return sizes.pop()


def _pil_one(path, make_view, max_pixels):
    """-> (uint8 HWC array, None) or (None, error)."""
    try:
        image = load_rgb(path, max_pixels)
        return apply_view(image, make_view(*image.size)), None
    except BadImage as e:
        return None, str(e)


class PILDecoder:
    name = "pil"

    def __init__(self, device, num_workers=2, max_pixels=MAX_PIXELS):
        self.device, self.max_pixels = torch.device(device), max_pixels
        self.pool = ThreadPoolExecutor(max(1, num_workers)) if num_workers > 0 else None

    def decode(self, paths, make_views):
        """paths[i] and make_views[i](width, height) -> View. Returns (images [n_ok, 3, S, S] on the device,
        ok [n] bools, errors [n] (None or a message naming the file))."""
        jobs = list(zip(paths, make_views, [self.max_pixels] * len(paths)))
        results = list(self.pool.map(lambda a: _pil_one(*a), jobs)) if self.pool else [_pil_one(*a) for a in jobs]
        ok = [arr is not None for arr, _ in results]
        arrays = [arr for arr, _ in results if arr is not None]
        images = torch.stack([to_tensor(a) for a in arrays]) if arrays else torch.empty(0, 3, 0, 0)
        return images.to(self.device, non_blocking=True), ok, [err for _, err in results]


def _dali_safe(data, fmt, mode):
    """Formats DALI's decoders take without surprises; the rest goes through PIL."""
    if fmt == "JPEG":
        return mode in ("RGB", "L") and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"  # complete stream
    return fmt == "PNG" and mode == "RGB"  # PIL composites alpha on white, DALI would drop it


class DALIDecoder:
    """A DALI pipeline fed through external sources (bytes, crop window, mirror): the caller decides the order
    and the crop parameters, so sharding, epoch shuffling and exact resume stay in one place (`StreamPlan`).
    A short batch is padded to the pipeline's batch size with copies of its last sample; the copies are dropped
    from the output and never counted."""
    name = "dali"

    def __init__(self, device, batch_size, num_workers=2, max_pixels=MAX_PIXELS):
        self.device, self.batch_size, self.max_pixels = torch.device(device), batch_size, max_pixels
        self.threads = max(1, num_workers)
        self.fallback = PILDecoder(device, 0, max_pixels)
        self._pipes = {}  # (size, center) -> built pipeline

    def _pipe(self, size, center):
        key = (size, center)
        if key not in self._pipes:
            self._pipes[key] = self._build(size, center)
        return self._pipes[key]

    def _build(self, size, center):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def pipe():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.FLOAT, ndim=1)  # window (y, x), source px
            shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)  # window (h, w)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            dec = dict(device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False)  # as PIL
            if center:  # ADM: bicubic resize of a sub-pixel region of the whole image (as images.center_crop)
                img = fn.decoders.image(data, **dec)
                img = fn.resize(img, size=[size, size], roi_start=start, roi_end=start + shape, roi_relative=False,
                                antialias=True, interp_type=types.INTERP_CUBIC)
            else:  # RandomResizedCrop: decode only the window (ROI decode), bicubic resize (official: interpolation=3)
                img = fn.decoders.image_slice(data, start, shape, axis_names="HW", normalized_anchor=False,
                                              normalized_shape=False, **dec)
                img = fn.resize(img, size=[size, size], antialias=True, interp_type=types.INTERP_CUBIC)
            return fn.crop_mirror_normalize(img, mirror=mirror, mean=[127.5] * 3, std=[127.5] * 3,
                                            output_layout="CHW", dtype=types.FLOAT)

        p = pipe()
        p.build()
        return p

    def decode(self, paths, make_views):
        n = len(paths)
        ok, errors, feed, fallback = [False] * n, [None] * n, [], []
        views = [None] * n
        for i, (path, make_view) in enumerate(zip(paths, make_views)):
            try:
                with open(path, "rb") as f:
                    data = f.read()
                w, h, fmt, mode = probe(path, self.max_pixels, data)
                views[i] = make_view(w, h)
            except (BadImage, OSError) as e:
                errors[i] = str(e)
                continue
            (feed if _dali_safe(data, fmt, mode) else fallback).append((i, data, w, h))
        size = _check_sizes([v for v in views if v is not None]) if any(v is not None for v in views) else 0
        out = {}
        for lo in range(0, len(feed), self.batch_size):
            chunk = feed[lo: lo + self.batch_size]
            try:
                images = self._run(chunk, [views[i] for i, *_ in chunk], size)
            except RuntimeError as e:  # a stream DALI rejects mid-decode: PIL redoes this batch
                log.warning("DALI failed on a batch (%s); decoding it with PIL", str(e).splitlines()[0][:200])
                self._pipes.clear()
                fallback += chunk
                continue
            out.update({i: images[k] for k, (i, *_) in enumerate(chunk)})
        if fallback:
            idx = [i for i, *_ in fallback]
            imgs, fok, ferr = self.fallback.decode([paths[i] for i in idx], [(lambda v: lambda w, h: v)(views[i])
                                                                            for i in idx])
            good = iter(imgs)
            for i, o, e in zip(idx, fok, ferr):
                if o:
                    out[i] = next(good)
                errors[i] = e
        for i in out:
            ok[i] = True
        if not out:
            return torch.empty(0, 3, 0, 0, device=self.device), ok, errors
        return torch.stack([out[i] for i in sorted(out)]), ok, errors

    def _run(self, chunk, views, size):
        center = views[0].window is None
        if any((v.window is None) != center for v in views):
            raise ValueError("one DALI batch mixes centre crops and random crops")
        pad = self.batch_size - len(chunk)
        rows = chunk + [chunk[-1]] * pad
        vs = views + [views[-1]] * pad
        windows = [adm_window(w, h, size) if v.window is None else v.window for (_, _, w, h), v in zip(rows, vs)]
        p = self._pipe(size, center)
        p.feed_input("data", [np.frombuffer(d, dtype=np.uint8) for _, d, _, _ in rows])
        p.feed_input("start", [np.array(win[:2], dtype=np.float32) for win in windows])
        p.feed_input("shape", [np.array(win[2:], dtype=np.float32) for win in windows])
        p.feed_input("mirror", [np.array(int(v.flip), dtype=np.int32) for v in vs])
        (batch,) = p.run()
        images = _to_torch(batch, self.device)
        return images[: len(chunk)]


def _to_torch(batch, device):
    """DALI TensorList -> torch tensor on `device`; on GPU the copy stays on the device (current stream)."""
    dense = batch.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(dense))

