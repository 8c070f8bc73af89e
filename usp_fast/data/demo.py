"""The demo dataset: an ImageFolder of real photographs, made from random crops of the photos that ship
with scikit-image (so the Quickstart needs no download)."""
import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# scikit-image's bundled colour/grey photographs; each becomes one class.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
          "moon", "page", "coins", "motorcycle_left", "retina")


def make_demo_imagefolder(root, num_images, seed=0, min_side=96):
    """Write `num_images` random crops (JPEG, random size and aspect) into root/train/<photo>/; skipped when
    the folder already holds that many."""
    from skimage import data as skdata

    train = Path(root) / "train"
    existing = list(train.rglob("*.JPEG")) if train.is_dir() else []
    if len(existing) >= num_images:
        return train
    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        try:
            img = getattr(skdata, name)()
        except Exception as e:  # noqa: BLE001 - a photo needing an optional download is simply skipped
            log.debug("demo photo %s unavailable: %s", name, e)
            continue
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        photos.append((name, img[..., :3].astype(np.uint8)))
    if not photos:
        raise RuntimeError("scikit-image ships no usable photographs here; pass data.root with real images")
    for i in range(num_images):
        name, img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch = int(rng.integers(min(min_side, h), h + 1))
        cw = int(np.clip(ch * rng.uniform(0.75, 1.33), min(min_side, w), w))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = train / name / f"{name}_{i:05d}.JPEG"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[top: top + ch, left: left + cw]).save(out, quality=90)
    log.info("demo: wrote %d real-photo crops in %d classes under %s", num_images, len(photos), train)
    return train
