"""Masked-latent restoration with a pretrained USP model (encoder + MAE decoder):
`python usp_fast/restore.py --run runs/NAME --images DIR [--mask-ratio 0.75] [--num 8] [--out restore.png]`.

Each image is centre-cropped (as the cache does) and VAE-encoded (posterior mean); a chosen fraction of its
latent patches is masked at random; the encoder sees the visible patches and the decoder predicts every patch.
The decoder predicts per-patch-normalised values (MAE's norm-pix target), and a masked patch's own mean and
variance are unknown, so they are taken from the visible patches of the same image (the mean of their per-patch
means and variances). Visible patches keep their true latents. The VAE decodes the result.

The PNG has one row per image: original | masked (masked patches grey) | restored.
Reads a pretrain run: its config.yaml (model, VAE, resolution) and a DeepSpeed checkpoint
(checkpoints/step_*/mp_rank_00_model_states.pt, 'module'): the latest complete one unless --checkpoint is given.
"""
import argparse
import contextlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernels.patch_norm_mse import patchify, unpatchify  # noqa: E402

MODEL_STATES = "mp_rank_00_model_states.pt"


@contextlib.contextmanager
def _keeping(model, num_keep):
    """Let the model's own random_masking keep `num_keep` patches instead of its training mask ratio."""
    saved = model.num_keep
    model.num_keep = num_keep
    try:
        yield
    finally:
        model.num_keep = saved


def visible_patch_stats(target, mask, eps):
    """Per image: the mean over visible patches of each patch's mean and (unbiased) variance -> ([B,1,1], [B,1,1])."""
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, unbiased=True)
    keep = (1 - mask)[..., None]
    n = keep.sum(1, keepdim=True)
    return (mean * keep).sum(1, keepdim=True) / n, ((var * keep).sum(1, keepdim=True) / n + eps).sqrt()


@torch.no_grad()
def restore_latents(model, latents, mask_ratio, generator=None):
    """latents [B, C, H, W] -> (restored latents [B, C, H, W], mask [B, L], 1 = masked)."""
    cfg, L = model.cfg, model.cfg.num_patches
    num_keep = int(round(L * (1 - mask_ratio)))
    if not 0 < num_keep <= L:
        raise ValueError(f"mask ratio {mask_ratio} keeps {num_keep} of {L} latent patches: need 0 <= ratio < 1")
    with _keeping(model, num_keep):
        ids_keep, ids_restore, mask = model.random_masking(latents.shape[0], latents.device, generator)
    pred = model.forward_decoder(model.forward_encoder(latents, ids_keep), ids_restore).float()
    target = patchify(latents.float(), cfg.patch_size)
    if cfg.norm_pix:
        mu, sd = visible_patch_stats(target, mask, cfg.norm_pix_eps)
        pred = pred * sd + mu
    m = mask[..., None]
    merged = target * (1 - m) + pred * m
    return unpatchify(merged, cfg.patch_size, cfg.in_chans), mask


def to_uint8(images):
    """[-1, 1] float NCHW -> uint8 NHWC."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def mask_pixels(images_u8, mask, patch_pixels, grey=128):
    """Grey out the image area of each masked latent patch. images_u8 [B, H, W, 3], mask [B, L]."""
    out = images_u8.copy()
    B, H, W, _ = out.shape
    g = H // patch_pixels
    m = mask.reshape(B, g, g).cpu().numpy().astype(bool)
    m = m.repeat(patch_pixels, 1).repeat(patch_pixels, 2)
    out[m] = grey
    return out


@torch.no_grad()
def restore_images(model, vae, images, mask_ratio, generator=None):
    """images [B, 3, R, R] in [-1, 1] -> (original, masked, restored) uint8 [B, R, R, 3] each."""
    latents, _ = vae.encode(images)
    restored, mask = restore_latents(model, latents.float(), mask_ratio, generator)
    original = to_uint8(images)
    patch_pixels = model.cfg.patch_size * vae.downsample
    return original, mask_pixels(original, mask, patch_pixels), to_uint8(vae.decode(restored))


def save_rows(original, masked, restored, path, gap=2):
    """One row per image: original | masked | restored, separated by white gaps."""
    from PIL import Image

    B, R = original.shape[:2]
    canvas = np.full((B * R + (B - 1) * gap, 3 * R + 2 * gap, 3), 255, dtype=np.uint8)
    for i in range(B):
        for j, panel in enumerate((original, masked, restored)):
            canvas[i * (R + gap): i * (R + gap) + R, j * (R + gap): j * (R + gap) + R] = panel[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return canvas


def resolve_checkpoint(run_dir, checkpoint=None):
    from usp_fast.engine import CKPT_DIR, complete_checkpoints

    if checkpoint is not None:
        path = Path(checkpoint)
        path = path / MODEL_STATES if path.is_dir() else path
    else:
        found = complete_checkpoints(Path(run_dir) / CKPT_DIR)
        if not found:
            raise FileNotFoundError(f"{Path(run_dir) / CKPT_DIR}: no complete checkpoint (step_*/COMPLETE) to restore "
                                    "with; pass --checkpoint")
        path = found[-1][1] / MODEL_STATES
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected a DeepSpeed checkpoint of a pretrain run")
    return path


def load_pretrain_model(run_dir, checkpoint=None, device="cpu"):
    """-> (USPViT with decoder, its config, vae). Reads <run_dir>/config.yaml and a checkpoint's 'module'."""
    from usp_fast.config import load_config
    from usp_fast.pretrain import PretrainTask
    from usp_fast.vae import load_vae

    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: --run must be a pretrain run directory")
    cfg = load_config(cfg_path)
    vae = load_vae(cfg.vae.name, cfg.vae.scale, device=device)
    latent = {"latent_channels": vae.latent_channels, "latent_size": cfg.data.resolution // vae.downsample}
    model = PretrainTask(cfg).build_model(latent)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "module" not in state:
        raise KeyError(f"{ckpt}: no 'module' state dict (keys: {sorted(state)})")
    model.load_state_dict({k: v.float() for k, v in state["module"].items()})
    return model.to(device).eval(), cfg, vae


def load_images(paths, resolution):
    from usp_fast.data.images import center_crop, load_rgb, to_tensor

    return torch.stack([to_tensor(center_crop(load_rgb(p), resolution)) for p in paths])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="pretrain run directory (config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder or its model-states file (default: latest)")
    p.add_argument("--images", required=True, help="an image file or a folder of images (searched recursively)")
    p.add_argument("--num", type=int, default=8, help="images to restore (the first N in sorted order)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of latent patches masked")
    p.add_argument("--seed", type=int, default=0, help="seeds the random masks")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/restore_mask<ratio>.png)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None):
    from usp_fast.data.images import IMAGE_EXTENSIONS

    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    src = Path(args.images)
    paths = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"--images {src}: no images found")
    model, cfg, vae = load_pretrain_model(args.run, args.checkpoint, device)
    images = load_images(paths[: args.num], cfg.data.resolution).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = restore_images(model, vae, images, args.mask_ratio, gen)
    out = Path(args.out) if args.out else Path(args.run) / f"restore_mask{args.mask_ratio:g}.png"
    save_rows(*rows, out)
    print(f"wrote {out}: {len(images)} rows of original | masked ({args.mask_ratio:.0%} of latent patches) | restored")
    return out


if __name__ == "__main__":
    main()
