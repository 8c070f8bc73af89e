"""Masked-latent restoration with a pretrained USP model (encoder + MAE decoder) (library; the command is
`usp-fast restore --run runs/NAME --images DIR [--mask-ratio R] [--num 8] [--out restore.png]`; the mask ratio
defaults to the run's model.mask_ratio).

Each image is centre-cropped (as the cache does) and VAE-encoded (posterior mean); a chosen fraction of its
latent patches is masked at random; the encoder sees the visible patches and the decoder predicts every patch.
The decoder predicts per-patch-normalised values (MAE's norm-pix target), and a masked patch's own mean and
variance are unknown, so they are taken from the visible patches of the same image (the mean of their per-patch
means and variances). Visible patches keep their true latents. The VAE decodes the result.

The PNG has one row per image: original | masked (masked patches grey) | restored.
Reads a pretrain run: its config.yaml (model, VAE, resolution) and a checkpoint (any ZeRO stage, through
usp_fast.artifacts.read_checkpoint): the newest good one unless a checkpoint folder is given.
"""
from pathlib import Path

import numpy as np
import torch

from usp_fast.data.images import image_files, load_images
from usp_fast.models.layers import patchify, unpatchify
from usp_fast.pictures import image_grid, save_png, to_uint8


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
    cfg = model.cfg
    ids_keep, ids_restore, mask = model.random_masking(latents.shape[0], latents.device, generator, mask_ratio)
    pred = model.forward_decoder(model.forward_encoder(latents, ids_keep), ids_restore).float()
    target = patchify(latents.float(), cfg.patch_size)
    if cfg.norm_pix:
        mu, sd = visible_patch_stats(target, mask, cfg.norm_pix_eps)
        pred = pred * sd + mu
    m = mask[..., None]
    merged = target * (1 - m) + pred * m
    return unpatchify(merged, cfg.patch_size, cfg.in_chans), mask


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
def restore_images(model, vae, images, mask_ratio, generator=None, latent_norm=None):
    """images [B, 3, R, R] in [-1, 1] -> (original, masked, restored) uint8 [B, R, R, 3] each. `latent_norm`: the
    run's usp_fast.vae.LatentNorm (applied to the encoded latents, undone before decoding)."""
    from usp_fast.vae import LatentNorm

    norm = latent_norm or LatentNorm()
    latents, _ = vae.encode(images)
    restored, mask = restore_latents(model, norm.normalize(latents.float()), mask_ratio, generator)
    restored = norm.denormalize(restored)
    original = to_uint8(images)
    patch_pixels = model.cfg.patch_size * vae.downsample
    return original, mask_pixels(original, mask, patch_pixels), to_uint8(vae.decode(restored))


def save_rows(original, masked, restored, path, gap=2):
    """One row per image: original | masked | restored, separated by white gaps. -> the canvas."""
    panels = np.stack([original, masked, restored], 1).reshape(-1, *original.shape[1:])  # row-major: o0 m0 r0 o1 ...
    canvas = image_grid(panels, cols=3, gap=gap, background=255)
    save_png(canvas, path)
    return canvas


def resolve_checkpoint(rdir, checkpoint=None):
    """A given checkpoint folder, else the run's newest checkpoint that passes its integrity check."""
    from usp_fast.artifacts import checkpoint_root, latest_good_checkpoint, verify_checkpoint
    from usp_fast.errors import CheckpointError

    if checkpoint is not None:
        path = Path(checkpoint)
        verify_checkpoint(path)
        return path
    path = latest_good_checkpoint(checkpoint_root(rdir))
    if path is None:
        raise CheckpointError(f"{checkpoint_root(rdir)}: no complete checkpoint to restore with; pass a checkpoint "
                              "folder")
    return path


def load_pretrain_model(rdir, checkpoint=None, device="cpu"):
    """-> (USPViT with decoder, its config, vae). Reads <rdir>/config.yaml and a checkpoint's module weights."""
    from usp_fast.artifacts import read_checkpoint
    from usp_fast.config import PretrainConfig, parse_config
    from usp_fast.errors import UserError
    from usp_fast.models.usp_vit import build_model_from_config
    from usp_fast.vae import load_vae

    cfg_path = Path(rdir) / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} is missing: --run must be a pretrain run directory")
    cfg = parse_config(PretrainConfig, cfg_path)
    vae = load_vae(cfg.vae.name, cfg.vae.scale, device=device)
    model = build_model_from_config(cfg.model, vae.latent_channels, cfg.data.resolution // vae.downsample)
    state, _ = read_checkpoint(resolve_checkpoint(rdir, checkpoint))
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, vae


def restore_folder(rdir, images, num=8, mask_ratio=None, seed=0, out=None, checkpoint=None, device="auto"):
    """Restoration rows for `num` images of a file or folder, spread evenly over its sorted files (so a folder of
    class subfolders shows several classes, not `num` pictures of the first) -> the PNG path."""
    from usp_fast.errors import UserError

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    src = Path(images)
    paths = image_files(src)
    if not paths:
        raise UserError(f"images {src}: no images found")
    model, cfg, vae = load_pretrain_model(rdir, checkpoint, device)
    mask_ratio = cfg.model.mask_ratio if mask_ratio is None else mask_ratio
    if not 0 <= mask_ratio < 1:
        raise UserError(f"--mask-ratio {mask_ratio}: expected a fraction in [0, 1)")
    picked = [paths[i * len(paths) // num] for i in range(num)] if len(paths) > num else paths
    batch = load_images(picked, cfg.data.resolution).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    from usp_fast.vae import LatentNorm

    rows = restore_images(model, vae, batch, mask_ratio, gen, LatentNorm.of_run(rdir))
    out = Path(out) if out else Path(rdir) / f"restore_mask{mask_ratio:g}.png"
    save_rows(*rows, out)
    return out
