"""Image sources: an ImageFolder tree or a file list, robust decoding, ADM-style centre crops and the
deterministic crop windows every decoder (PIL or DALI) applies.

A source is a list of (path, label) plus class names. Decoding handles RGB, grayscale, CMYK, palette and
alpha images; a corrupt, truncated, empty or oversized file raises `BadImage`, which callers skip and count
(or make fatal) so one bad file never kills a run.

A `View` (crop window, output size, flip) is drawn from (seed, epoch, image index) only, so the PIL and DALI
paths produce the same pixels for the same sample and a resumed run sees exactly the same crops.
"""
import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..seeding import view_rng

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 10000 * 10000  # larger images are skipped as bad input (decoding one would take GBs of memory)


class BadImage(Exception):
    pass


class SourceError(DataError):
    pass


# How to give a flat folder (images with no class subfolders, e.g. ImageNet's val/) its labels.
LABELS_HINT = ("put the images in one subfolder per class (<root>/<class>/*.JPEG; ImageNet's flat val/: move each "
               "image into its class folder with the devkit's labels), or list 'path label' lines in data.file_list")


def class_root(root):
    """The class-directory level of data.root: its train/ when it has one."""
    root = Path(root)
    return root / "train" if (root / "train").is_dir() else root


def is_flat_folder(root):
    """data.root holds no class subfolders: its images are one class, every label 0 (pretraining and
    unconditional generation are fine with that; a stage that needs labels is not)."""
    root = class_root(root)
    return root.is_dir() and not any(d.is_dir() for d in root.iterdir())


def list_images(root=None, file_list=None, need_labels=False, hint=""):
    """-> (items [(path, label)], class_names). `root` may hold `train/` or be the class-directory level; a flat
    folder of images is one class (label 0), refused with `need_labels` (a stage that trains or evaluates on
    class labels; `hint` ends the message, e.g. the stage's label-free option)."""
    if (root is None) == (file_list is None):
        raise SourceError("data: set exactly one of data.root (an ImageFolder tree) or data.file_list")
    if file_list is not None:
        return _read_file_list(Path(file_list))
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"data.root {root} is not a directory (expected train/<class>/*.JPEG)")
    root = class_root(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    items = []
    if classes:
        for label, name in enumerate(classes):
            items += [(str(p), label) for p in sorted((root / name).rglob("*")) if _is_image(p)]
    else:  # a flat folder of images: one class
        classes = [root.name]
        items = [(str(p), 0) for p in sorted(root.iterdir()) if _is_image(p)]
    if not items:
        raise SourceError(f"data.root {root}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
    if need_labels and len(classes) == 1 and is_flat_folder(root):
        raise SourceError(f"data.root {root}: {len(items)} images directly in the folder and no class subfolders, "
                          f"so every label would be 0, and this stage needs class labels: {LABELS_HINT}{hint}")
    return items, classes


def _is_image(p):
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _read_file_list(path):
    """Lines 'path [label]'; relative paths are taken from the list's folder; '#' starts a comment."""
    if not path.is_file():
        raise SourceError(f"data.file_list {path} does not exist")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        label = 0
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            line, label = parts[0], int(parts[1])
        if label < 0:
            raise SourceError(f"{path}:{n}: label {label} is negative")
        p = Path(line)
        items.append((str(p if p.is_absolute() else path.parent / p), label))
    if not items:
        raise SourceError(f"data.file_list {path} lists no images")
    num_classes = max(label for _, label in items) + 1
    return items, [str(i) for i in range(num_classes)]


def image_list_hash(items, root_hint=""):
    """A hash of the ordered (relative path, label) list: identifies which images a cache holds."""
    h = hashlib.sha256()
    common = Path(items[0][0]).parent.parent if items else Path(".")
    for path, label in items:
        try:
            rel = Path(path).relative_to(common)
        except ValueError:
            rel = Path(path)
        h.update(f"{rel.as_posix()}\t{label}\n".encode())
    return h.hexdigest()


def probe(path, max_pixels=MAX_PIXELS, data=None):
    """Read only the header (of the file, or of its bytes `data` when given): -> (width, height, format, mode);
    BadImage for empty, unreadable or huge files."""
    try:
        if (len(data) if data is not None else Path(path).stat().st_size) == 0:
            raise BadImage(f"{path}: empty file (0 bytes)")
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(f"{path}: too large ({w}x{h} pixels, limit {max_pixels})")
            return w, h, im.format, im.mode
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: cannot decode ({type(e).__name__}: {e})") from e


def load_rgb(path, max_pixels=MAX_PIXELS):
    """Decode any supported image to RGB; raises BadImage naming the file and the reason."""
    try:
        probe(path, max_pixels)
        with Image.open(path) as im:
            im.load()  # forces a full decode: truncated data fails here, not later
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: cannot decode ({type(e).__name__}: {e})") from e


def center_crop(image, size):
    """ADM-style centre crop: BOX-halve while the short side is >= 2x size, bicubic-resize the short side to
    `size`, then crop the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


class View:
    """What to cut from an image: the window (top, left, height, width) in source pixels, resized to
    size x size, then mirrored if `flip`. window=None means the ADM centre crop. `augment` (PIL image -> PIL
    image, e.g. a seeded RandAugment) runs on the resized crop, before the flip; only the PIL decoder applies it."""
    __slots__ = ("window", "size", "flip", "augment")

    def __init__(self, window, size, flip=False, augment=None):
        self.window, self.size, self.flip, self.augment = window, size, bool(flip), augment

    def __repr__(self):
        return f"View(window={self.window}, size={self.size}, flip={self.flip})"


def rrc_window(rng, width, height, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's window (torchvision's algorithm: 10 tries, then a centre crop of clamped aspect)."""
    area = width * height
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(seed, epoch, index, width, height, size, crop="rrc", scale=(0.2, 1.0), flip=True):
    """The view of image `index` in `epoch`: a pure function of its arguments (exact resume, PIL == DALI)."""
    rng = view_rng(seed, epoch, index)
    window = rrc_window(rng, width, height, scale) if crop == "rrc" else None
    return View(window, size, flip and bool(rng.integers(0, 2)))


def apply_view(image, view):
    """PIL image -> uint8 HWC array: the view's window resized (bicubic, antialiased: torchvision's
    RandomResizedCrop with interpolation=3, as the official USP/MAE pretraining) or the ADM centre crop."""
    if view.window is None:
        arr = center_crop(image, view.size)
    else:
        top, left, h, w = view.window
        # crop first: the resize filter must not reach outside the window (DALI slices before resizing)
        arr = np.asarray(image.crop((left, top, left + w, top + h)).resize((view.size, view.size), Image.BICUBIC))
    if view.augment is not None:
        arr = np.asarray(view.augment(Image.fromarray(arr)))
    return np.ascontiguousarray(arr[:, ::-1]) if view.flip else arr


def adm_window(width, height, size):
    """The ADM centre crop's footprint in source pixels (float top, left, height, width): what `center_crop`
    keeps, for decoders that resize a sub-pixel region directly (DALI)."""
    f, w, h = 1, width, height
    while min(w, h) >= 2 * size:  # each BOX halving drops an odd last row/column
        f, w, h = f * 2, w // 2, h // 2
    scale = size / min(w, h)
    w2, h2 = round(w * scale), round(h * scale)
    sy, sx = f * h / h2, f * w / w2
    return (h2 - size) // 2 * sy, (w2 - size) // 2 * sx, size * sy, size * sx


def image_files(path):
    """An image file -> [it]; a folder -> its image files, searched recursively, in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_images(paths, resolution):
    """Image files -> their ADM centre crops, a float batch [n, 3, R, R] in [-1, 1]."""
    return torch.stack([to_tensor(center_crop(load_rgb(p), resolution)) for p in paths])


def to_tensor(arr):
    """uint8 HWC -> float CHW in [-1, 1] (mean = std = 0.5 normalisation)."""
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)
