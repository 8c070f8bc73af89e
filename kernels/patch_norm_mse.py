"""Patch-normalised MSE: MAE's norm_pix_loss on latents.

pred   [B, L, p*p*C]  decoder output, each row laid out (p_row, p_col, channel) as `patchify` produces.
target [B, C, H, W]   the latents; L = (H/p)*(W/p) patches in row-major order.
mask   [B, L]         1 where the patch was masked (and is scored), 0 where visible.
Each target patch is normalised by its own mean and unbiased variance (+eps) when `norm_pix`; the squared
error is averaged over a patch, then over masked patches. Accumulation is fp32 whatever the input dtype.
"""
import torch


def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"patchify: latent size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x, p, channels):
    """[B, L, p*p*C] -> [B, C, H, W] for a square grid."""
    B, L, _ = x.shape
    h = w = int(round(L**0.5))
    if h * w != L:
        raise ValueError(f"unpatchify: {L} patches do not form a square grid")
    x = x.reshape(B, h, w, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * p, w * p)


def patch_norm_mse_reference(pred, target, mask, patch_size, norm_pix=True, eps=1e-6):
    t = patchify(target.float(), patch_size)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True, unbiased=True)
        t = (t - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - t).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()
