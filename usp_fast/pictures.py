"""Pictures: model images to uint8 (one rounding rule), image grids (optionally with row labels), atomic PNGs."""
import math
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path


def to_uint8(images):
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 numpy, by ADM's rule: (127.5 x + 128) clamped to [0, 255] and
    truncated (so x = u / 127.5 - 1 gives back u exactly); the guided-diffusion evaluator's samples are made so."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images, cols=None, gap=0, background=0, row_labels=None, label_pad=4):
    """uint8 images [N, H, W, C] -> one uint8 array: row-major, `cols` per row (default ceil(sqrt(N))), `gap` pixels
    of `background` between cells (none around the edge); empty cells of the last row are `background`. With
    `row_labels` (one string per row) each row's label is written at its left, in PIL's default font, on a strip
    as wide as the longest label plus `label_pad` on each side."""
    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images, dtype=np.uint8)
    n, h, w, c = images.shape
    cols = cols or max(math.ceil(math.sqrt(n)), 1)
    rows = math.ceil(n / cols)
    font = left = None
    if row_labels is not None:
        if len(row_labels) != rows:
            raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
        font = ImageFont.load_default()
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        boxes = [measure.textbbox((0, 0), str(t), font=font) for t in row_labels]
        left = max(b[2] for b in boxes) + 2 * label_pad
    canvas = np.full((rows * h + (rows - 1) * gap, (left or 0) + cols * w + (cols - 1) * gap, c), background,
                     dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        y, x = r * (h + gap), (left or 0) + k * (w + gap)
        canvas[y:y + h, x:x + w] = img
    if row_labels is None:
        return canvas
    picture = Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
    draw = ImageDraw.Draw(picture)
    ink = 0 if np.mean(background) > 127 else 255
    for r, (text, box) in enumerate(zip(row_labels, boxes)):
        top = r * (h + gap) + (h - (box[3] - box[1])) // 2 - box[1]
        draw.text((label_pad, top), str(text), font=font, fill=ink if c == 1 else (ink,) * c)
    return np.asarray(picture).reshape(canvas.shape)


def save_png(array, path):
    """uint8 [H, W, 3] (or [H, W]) -> a PNG at `path`, written atomically (usp_fast.io.atomic_path); creates the
    folder. -> the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp, format="PNG")  # tmp's suffix is not .png
    return path


def new_figure(rows=1, cols=1, figsize=(7.0, 4.0)):
    """A matplotlib figure (headless backend) -> (fig, axes [rows, cols])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=figsize, squeeze=False)


def save_figure(fig, path, dpi=80):
    """Lay out, write atomically as PNG (creating the folder) and close a figure. -> the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def plot_training_curves(rows, path, title=""):
    """metrics.jsonl rows -> a PNG of the loss (log scale) and the learning rate against steps, written atomically.
    -> the path."""
    steps = [r["step"] for r in rows]
    fig, ((ax_loss, ax_lr),) = new_figure(1, 2, figsize=(10, 3.6))
    ax_loss.plot(steps, [r["loss"] for r in rows], color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    if all(r["loss"] > 0 for r in rows):
        ax_loss.set_yscale("log")
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_loss.grid(alpha=0.3)
    ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_probe_blocks(series, path, title="linear probe per block"):
    """{label: {block index: top-1 %}} -> a PNG of accuracy against block index, one line per label (a noise level
    or a model), as the paper's Figure 4. -> the path."""
    fig, ((ax,),) = new_figure(figsize=(6, 4))
    for label, acc in series.items():
        blocks = sorted(acc)
        ax.plot(blocks, [acc[b] for b in blocks], marker="o", label=label)
    ax.set(xlabel="block", ylabel="top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def label_palette(num_classes, ignore_index=255):
    """A fixed palette: uint8 [256, 3], class k's colour the same in every picture and run (a seeded draw of
    saturated colours); ignore_index (and unused entries) black."""
    import colorsys

    rng = np.random.default_rng(20260)  # fixed: the palette never depends on a run
    pal = np.zeros((256, 3), dtype=np.uint8)
    for k in range(min(num_classes, 255)):
        h = (k * 0.618033988749895 + rng.uniform(0, 0.05)) % 1.0  # golden-ratio hues: neighbours differ
        pal[k] = np.round(np.array(colorsys.hsv_to_rgb(h, 0.55 + 0.45 * (k % 2), 0.95 - 0.25 * (k % 3 == 2))) * 255)
    pal[ignore_index] = 0
    return pal


def segmentation_panel(rows, palette, height=160, gap=4):
    """[(uint8 image [H, W, 3], ground truth [H, W], prediction [H, W])] -> one uint8 picture, a row per image:
    image | ground truth | prediction, each scaled to `height` (masks by nearest neighbour)."""
    from PIL import Image

    cells = []
    for image, truth, pred in rows:
        w = max(1, round(image.shape[1] * height / image.shape[0]))
        pic = np.asarray(Image.fromarray(image).resize((w, height), Image.BILINEAR))
        maps = [np.asarray(Image.fromarray(palette[m]).resize((w, height), Image.NEAREST)) for m in (truth, pred)]
        cells.append([pic, *maps])
    width = max(c[0].shape[1] for c in cells)
    canvas = np.full((len(cells) * (height + gap) - gap, 3 * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(cells):
        for k, cell in enumerate(row):
            y, x = r * (height + gap), k * (width + gap)
            canvas[y:y + height, x:x + cell.shape[1]] = cell
    return canvas
