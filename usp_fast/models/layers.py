"""Transformer pieces shared by the USP ViT and DiT/SiT. Parameter names follow timm's ViT
(attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2) so weights transfer by name."""
import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention


def run_block(block, *args, recompute=False):
    """block(*args); with `recompute` (train.activation_checkpointing) and grad enabled, its activations are not
    kept but recomputed in the backward pass: non-reentrant torch.utils.checkpoint, which works under ZeRO-3 and
    torch.compile and restores the RNG state, so a recomputed block draws the same random numbers."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class GradCheckpointing:
    """`model.set_grad_checkpointing(True)`: timm's name for it, so the Trainer switches every model the same way
    (the timm classifier has its own)."""
    grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = bool(enable)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act="gelu"):
        super().__init__()
        if act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"mlp activation {act!r}: expected 'gelu' (exact, MAE/ViT) or 'gelu_tanh' (DiT)")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, act="gelu", norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_pos_embed_2d(dim, grid_size, num_prefix=0):
    """Fixed 2-D sin-cos position embedding [num_prefix + grid*grid, dim] (prefix rows are zero), as MAE and DiT:
    the first dim/2 channels encode the column (w) index, the last dim/2 the row (h) index, each half sin then
    cos. (MAE's table takes its first half from meshgrid(w, h)[0], the column coordinate.)"""
    if dim % 4:
        raise ValueError(f"sin-cos pos-emb needs a width divisible by 4, got {dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    gw, gh = np.meshgrid(coords, coords)  # w varies fastest, matching row-major patch order

    def one_axis(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_axis(gw), one_axis(gh)], axis=1)
    emb = np.concatenate([np.zeros((num_prefix, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """PatchConv: a p x p stride-p convolution on latents -> [B, L, D]."""

    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], each row laid out (p_row, p_col, channel) as the decoder predicts."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"patchify: latent size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x, p, channels):
    """[B, L, p*p*C] -> [B, C, H, W] for a square grid: the inverse of `patchify`."""
    B, L, _ = x.shape
    h = w = int(round(L**0.5))
    if h * w != L:
        raise ValueError(f"unpatchify: {L} patches do not form a square grid")
    x = x.reshape(B, h, w, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * p, w * p)
