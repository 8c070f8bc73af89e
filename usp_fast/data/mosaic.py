"""A small labelled segmentation set made from real photos, in the ADE20K layout (usp_fast.data.segmentation),
because no segmentation data set can be downloaded here (docs/segmentation.md).

Each picture is a mosaic of 3-6 regions with irregular boundaries: a Voronoi partition of random seed points,
computed on coordinates displaced by a smooth random field (a sum of random sinusoids), so boundaries wander.
Every region gets a class at random and is filled with a photo of that class: a random square crop (60-100% of
the short side) of a random photo of it, resized to the region's bounding box and cut to its shape. The mask
labels each region's pixels with its class + 1; a 1-pixel band along every boundary is 0 (ignored, ADE's
"other"), so evaluation never scores the seam where two photos meet.

Photo sources:
  an ImageFolder with train/ and validation/ splits of class folders (clothing-256 in ../shared: 10 classes):
      training mosaics draw from train/ photos only, validation mosaics from validation/ photos only;
  scikit-image's bundled photographs (no ../shared): one class per photo; training mosaics crop the left 60% of
      each photo, validation mosaics the right 40%, so the two splits share no pixels (but do share photos).
`make_mosaic_set` is deterministic in its seed and is skipped when the folder already holds the set.
"""
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import atomic_write_text
from .images import list_images, load_rgb

log = logging.getLogger(__name__)


def region_map(rng, size, regions=(3, 6), warp=0.08):
    """-> int [size, size] region ids 0..K-1: a Voronoi partition of K random points on warped coordinates."""
    k = int(rng.integers(regions[0], regions[1] + 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    wy, wx = yy.copy(), xx.copy()
    for _ in range(3):  # smooth displacement: random low-frequency sinusoids
        f, ph = rng.uniform(1.5, 5.0, 2), rng.uniform(0, 2 * np.pi, 2)
        wy += warp * np.sin(2 * np.pi * f[0] * xx + ph[0])
        wx += warp * np.sin(2 * np.pi * f[1] * yy + ph[1])
    pts = rng.uniform(0.05, 0.95, (k, 2))
    d = (wy[None] - pts[:, 0, None, None]) ** 2 + (wx[None] - pts[:, 1, None, None]) ** 2
    return d.argmin(0)


def boundary(ids):
    """Pixels whose right or lower neighbour lies in another region: a 1-pixel seam along every boundary."""
    b = np.zeros(ids.shape, dtype=bool)
    b[:-1] |= ids[1:] != ids[:-1]
    b[:, :-1] |= ids[:, 1:] != ids[:, :-1]
    return b


def _crop_fill(rng, photo, h, w, frac=(0.6, 1.0)):
    """A random square crop of a PIL photo resized to w x h -> uint8 [h, w, 3]."""
    pw, ph = photo.size
    side = int(min(pw, ph) * rng.uniform(*frac))
    top, left = int(rng.integers(0, ph - side + 1)), int(rng.integers(0, pw - side + 1))
    return np.asarray(photo.crop((left, top, left + side, top + side)).resize((w, h), Image.BILINEAR))


def mosaic(rng, size, sources):
    """sources: {class index: [PIL photos]} -> (uint8 image [size, size, 3], uint8 mask [size, size])."""
    ids = region_map(rng, size)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    classes = sorted(sources)
    for r in np.unique(ids):
        c = classes[int(rng.integers(0, len(classes)))]
        ys, xs = np.nonzero(ids == r)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        photo = sources[c][int(rng.integers(0, len(sources[c])))]
        fill = _crop_fill(rng, photo, y1 - y0, x1 - x0)
        image[ys, xs] = fill[ys - y0, xs - x0]
        mask[ys, xs] = c + 1
    mask[boundary(ids)] = 0
    return image, mask


def _folder_sources(photo_root, split, per_class, rng):
    items, names = list_images(Path(photo_root) / split)
    by_class = {}
    for path, label in items:
        by_class.setdefault(label, []).append(path)
    sources = {}
    for label, paths in by_class.items():
        pick = rng.permutation(len(paths))[:per_class]
        sources[label] = [load_rgb(paths[i]) for i in sorted(pick)]
    return sources, names


def _skimage_sources(split):
    from .demo import skimage_photos

    sources, names = {}, []
    for c, (name, arr) in enumerate(skimage_photos()):
        w = arr.shape[1]
        part = arr[:, : int(w * 0.6)] if split == "train" else arr[:, int(w * 0.6):]
        sources[c], names = [Image.fromarray(np.ascontiguousarray(part))], names + [name]
    return sources, names


def make_mosaic_set(root, photo_root=None, num_train=200, num_val=50, size=256, seed=0, per_class=40):
    """Write the mosaic set at `root` (images/, annotations/, classes.txt, mosaic.json) from the photos of
    `photo_root` (an ImageFolder with train/ and validation/), or scikit-image's photographs when it is None or
    missing. Skipped when root/mosaic.json already describes a finished set. -> root."""
    root = Path(root)
    if (root / "mosaic.json").is_file():
        return root
    use_folder = photo_root is not None and (Path(photo_root) / "train").is_dir() \
        and (Path(photo_root) / "validation").is_dir()
    if photo_root is not None and not use_folder:
        log.info("mosaic set: %s has no train/ and validation/ splits; using scikit-image's photographs", photo_root)
    rng = np.random.default_rng(seed)
    names = None
    for split, folder, count in (("train", "training", num_train), ("validation", "validation", num_val)):
        if use_folder:
            sources, names = _folder_sources(photo_root, split, per_class, rng)
        else:
            sources, names = _skimage_sources(split)
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = mosaic(rng, size, sources)
            Image.fromarray(image).save(root / "images" / folder / f"mosaic_{i:05d}.jpg", quality=90)
            Image.fromarray(mask, mode="L").save(root / "annotations" / folder / f"mosaic_{i:05d}.png")
    atomic_write_text(root / "classes.txt", "".join(f"{n}\n" for n in names))
    info = {"source": str(photo_root) if use_folder else "scikit-image photographs", "classes": names,
            "num_train": num_train, "num_val": num_val, "size": size, "seed": seed,
            "photos_per_class": per_class if use_folder else 1, "how": __doc__.split("\n\n")[1]}
    atomic_write_text(root / "mosaic.json", json.dumps(info, indent=1))  # last: the set is finished
    log.info("mosaic set: %d training + %d validation mosaics of %d classes (%s) under %s", num_train, num_val,
             len(names), info["source"], root)
    return root
