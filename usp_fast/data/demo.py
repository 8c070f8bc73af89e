"""The demo datasets, made from data that ships inside installed packages (so the Quickstart needs no download):
  photos: an ImageFolder of random crops of scikit-image's bundled photographs, one class per photo (pretraining
          and its restoration pictures);
  digits: scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels, 10 classes) upscaled to PNGs, the
          generation demo's data: small enough that a CPU-trained SiT learns to draw each class in minutes.
`make_demo_imagefolder` (data.demo_images > 0) builds digits for a root whose folder name ends in "digits"
(data/demo_digits) and photo crops for any other root."""
import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# scikit-image's bundled colour/grey photographs; each becomes one class.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
          "moon", "page", "coins", "motorcycle_left", "retina")


DIGIT_SIDE = 32  # PNG side of a demo digit: the 8x8 scan upscaled 4x (the generate demo reads them at 16 px)


def is_digits_root(root):
    return Path(root).name.lower().endswith("digits")


def make_demo_imagefolder(root, num_images, seed=0, min_side=96):
    """Write the demo ImageFolder at root, skipped when it already holds `num_images` images: for a root named
    *digits, the first `num_images` of scikit-learn's digits (see make_digits_imagefolder); otherwise
    `num_images` random crops (JPEG, random size and aspect) of scikit-image's photos in root/train/<photo>/."""
    if is_digits_root(root):
        return make_digits_imagefolder(root, num_images)
    train = Path(root) / "train"
    existing = list(train.rglob("*.JPEG")) if train.is_dir() else []
    if len(existing) >= num_images:
        return train
    rng = np.random.default_rng(seed)
    photos = skimage_photos()
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


def skimage_photos():
    """scikit-image's bundled photographs that load here -> [(name, uint8 RGB array)] (grey ones as RGB)."""
    from skimage import data as skdata

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
    return photos


def load_digits_array():
    """scikit-learn's bundled handwritten digits -> (images uint8 [1797, 8, 8] in 0..255, ink bright; labels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dependency of usp-fast; only a broken install lacks it
        raise RuntimeError("the digits demo needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def digit_pictures(images, side=DIGIT_SIDE):
    """uint8 [N, 8, 8] digits -> uint8 [N, side, side] pictures: dark ink on white, bicubic-upscaled (a smooth
    stroke rather than 8x8 blocks)."""
    return np.stack([np.asarray(Image.fromarray(255 - im).resize((side, side), Image.BICUBIC)) for im in images])


def make_digits_imagefolder(root, num_images=1797, side=DIGIT_SIDE):
    """Write the first `num_images` (at most 1,797) of scikit-learn's handwritten digits as grey (RGB) PNGs of
    `side` px into root/train/digit<k>/ (the folder order is the digit order, so class k is digit k); skipped
    when the folder already holds that many."""
    train = Path(root) / "train"
    existing = list(train.rglob("*.png")) if train.is_dir() else []
    images, labels = load_digits_array()
    num_images = min(int(num_images), len(images))
    if len(existing) >= num_images:
        return train
    for i, (pic, label) in enumerate(zip(digit_pictures(images[:num_images], side), labels[:num_images])):
        out = train / f"digit{label}" / f"digit{label}_{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pic).convert("RGB").save(out)
    log.info("demo: wrote %d handwritten digits (scikit-learn, %d px) in 10 classes under %s", num_images, side,
             train)
    return train
