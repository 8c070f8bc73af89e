"""Analytic FLOP counts of the USP ViT pretrain model and DiT/SiT, per image, for MFU.

Convention (the usual one of MFU, e.g. PaLM's): count the matmul FLOPs only, 2*m*n*k for every m x k by k x n
product: each linear, the patch convolution (a linear over p*p*C patch vectors), and attention's QK^T and AV
(2*N*N*D each per layer, summed over heads). LayerNorms, activations, softmax, gathers, embeddings lookups and the
loss are element-wise and left out. Training FLOPs = 3 x forward (backward = 2 x forward: one product for the
input gradient, one for the weight gradient). That slightly over-counts: a layer whose input needs no gradient
(the patch conv on the latents, the timestep MLP's first layer on fixed sin-cos features) has no input-gradient
product. `no_input_grad` says how much that is, so a FLOP counter can be matched exactly; it is < 0.03% of the
forward at the paper sizes. Activation recomputation, if ever used, is not counted (model FLOPs, not hardware
FLOPs).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Flops:
    """FLOPs per image. forward: the forward pass; no_input_grad: forward FLOPs of layers whose input needs no
    gradient (what the backward of those layers does not compute)."""
    forward: int
    no_input_grad: int

    @property
    def train(self):
        """Training FLOPs per image by the 3 x forward convention."""
        return 3 * self.forward


def linear(tokens, d_in, d_out):
    return 2 * tokens * d_in * d_out


def attention(tokens, dim):
    """QK^T and AV over all heads: heads * (2 N^2 d) each, with heads * d = dim."""
    return 2 * (2 * tokens * tokens * dim)


def vit_block(tokens, dim, hidden):
    """Pre-norm ViT block (usp_fast/models/layers.py): qkv, attention, proj, MLP fc1 and fc2. The DiT block is the
    same plus its adaLN modulation, counted by the caller (it acts on the [B, D] condition, not on the tokens)."""
    return (linear(tokens, dim, 3 * dim) + attention(tokens, dim) + linear(tokens, dim, dim)
            + 2 * linear(tokens, dim, hidden))


def usp_vit(cfg):
    """USPViT (usp_fast/models/usp_vit.py) training forward for a USPViTConfig: patch conv on all L patches, encoder
    over cls + the K visible tokens, decoder embed, decoder over cls + all L tokens, prediction head over all of
    them (the cls row is dropped after the head)."""
    L, D, Dd = cfg.num_patches, cfg.embed_dim, cfg.decoder_dim
    patch_in = cfg.patch_size**2 * cfg.in_chans
    num_keep = int(L * (1 - cfg.mask_ratio))  # as USPViT.num_keep
    enc, dec = 1 + num_keep, 1 + L
    patch = linear(L, patch_in, D)
    forward = (patch + cfg.depth * vit_block(enc, D, int(D * cfg.mlp_ratio)) + linear(enc, D, Dd)
               + cfg.decoder_depth * vit_block(dec, Dd, int(Dd * cfg.mlp_ratio)) + linear(dec, Dd, patch_in))
    return Flops(forward, patch)


def dit(cfg, frequency_dim=256):
    """DiT/SiT (usp_fast/models/dit.py) forward for a DiTConfig: patch conv, timestep MLP (frequency_dim -> D -> D),
    per block the adaLN modulation (D -> 6D on the condition) and the ViT block over all T tokens, the final
    layer's modulation (D -> 2D) and its linear (D -> p*p*out_channels per token)."""
    T, D = cfg.grid_size**2, cfg.hidden_size
    patch = linear(T, cfg.patch_size**2 * cfg.in_channels, D)
    t_in = linear(1, frequency_dim, D)
    forward = (patch + t_in + linear(1, D, D)
               + cfg.depth * (linear(1, D, 6 * D) + vit_block(T, D, int(D * cfg.mlp_ratio)))
               + linear(1, D, 2 * D) + linear(T, D, cfg.patch_size**2 * cfg.out_channels))
    return Flops(forward, patch + t_in)
