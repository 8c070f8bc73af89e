"""Patch-normalised MSE: MAE's norm_pix_loss on latents.

pred   [B, L, p*p*C]  decoder output, each row laid out (p_row, p_col, channel) as `patchify` produces.
target [B, C, H, W]   the latents; L = (H/p)*(W/p) patches in row-major order.
mask   [B, L]         1 where the patch was masked (and is scored), 0 where visible.
Each target patch is normalised by its own mean and unbiased variance (+eps) when `norm_pix`; the squared
error is averaged over a patch, then over masked patches. Accumulation is fp32 whatever the input dtype.
"""
import torch

from . import _triton_utils as tu


def _patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]: the reference path's target layout. The same reshape as
    usp_fast.models.layers.patchify (this package does not import usp_fast; a test keeps the two equal)."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"patchify: latent size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def patch_norm_mse_reference(pred, target, mask, patch_size, norm_pix=True, eps=1e-6):
    t = _patchify(target.float(), patch_size)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True, unbiased=True)
        t = (t - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - t).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------------------------
# Triton path: one launch forward, one backward. Each program takes a block of patches, reads their target values
# straight out of the [B, C, H, W] latents through its strides (no patchified copy), normalises them in registers
# and writes one partial loss sum and one partial mask count; the last program to finish (an atomic counter)
# sums the partials in program order and writes the loss and the masked count. The backward recomputes the
# normalised target (cheaper than storing it), reads d(loss) and the count from device memory (no host sync,
# no extra launch) and writes d(pred). Masks are read as given (bool, integer or float): no conversion copy.
# The @triton.jit kernel is in _patch_norm_mse_jit.py, imported at the first launch: this module needs no triton.
# ---------------------------------------------------------------------------------------------------------------

# Patches per program: ~1K elements keeps many programs in flight for the small decoder head.
_PATCH_TILE_ELEMENTS = 1024
# Partials the last program reads per loop step.
_REDUCE_BLOCK = 1024
# One zeroed int32 counter per device, reset to 0 by the last program of each launch. Launches on one stream run
# in order, so they never share it concurrently (the engine issues them on the default stream).
_COUNTERS = {}


def _counter(device):
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _launch_patch_norm_mse(pred, target, mask, patch_size, norm_pix, eps, count, loss=None, dloss=None, dpred=None):
    """Forward (loss given): writes loss and count. Backward (dloss, dpred given): reads dloss and count, writes
    dpred."""
    from ._patch_norm_mse_jit import _patch_norm_mse_kernel  # the first launch imports triton

    B, L, N = pred.shape
    C, W = target.shape[1], target.shape[3]
    block_n = tu.next_pow2(N)
    rows = min(max(1, _PATCH_TILE_ELEMENTS // block_n), tu.next_pow2(B * L))
    programs = tu.cdiv(B * L, rows)
    backward = dpred is not None
    part = count if backward else torch.empty(2 * programs, dtype=torch.float32, device=pred.device)
    cfg = tu.launch_config(f"patch_norm_mse/{'bwd' if backward else 'fwd'}", N, pred.dtype, rows * block_n)
    _patch_norm_mse_kernel[(programs,)](
        pred, target, mask, dloss if backward else count, count if backward else loss, count, part,
        _counter(pred.device),
        dpred if backward else pred,
        B * L, L, W // patch_size, N, C,
        pred.stride(0), pred.stride(1), *target.stride(), eps,
        P=patch_size, NORM_PIX=norm_pix, BACKWARD=backward, ROWS=rows, BLOCK_N=block_n,
        BLOCK_P=min(_REDUCE_BLOCK, tu.next_pow2(programs)), num_warps=cfg["num_warps"],
    )


class _PatchNormMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, mask, patch_size, norm_pix, eps):
        B, C, H, W = target.shape
        if H % patch_size or W % patch_size:
            raise ValueError(f"patch_norm_mse: latent size {H}x{W} is not divisible by patch size {patch_size}")
        L, N = (H // patch_size) * (W // patch_size), patch_size * patch_size * C
        if tuple(pred.shape) != (B, L, N):
            raise ValueError(f"patch_norm_mse: pred must be [{B}, {L}, {N}] for target {tuple(target.shape)} and "
                             f"patch size {patch_size}, got {tuple(pred.shape)}")
        if tuple(mask.shape) != (B, L):
            raise ValueError(f"patch_norm_mse: mask must be [{B}, {L}], got {tuple(mask.shape)}")
        tu.check_same_device("patch_norm_mse", pred, target, mask)
        pred = tu.unit_stride_rows(pred)
        mask = mask.contiguous()  # [B, L]: tiny, and a no-op when it already is
        loss = torch.empty((), dtype=torch.float32, device=pred.device)
        count = torch.empty((), dtype=torch.float32, device=pred.device)  # masked patches
        _launch_patch_norm_mse(pred, target, mask, patch_size, norm_pix, eps, count, loss=loss)
        ctx.save_for_backward(pred, target, mask, count)
        ctx.config = (patch_size, norm_pix, eps)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        pred, target, mask, count = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        patch_size, norm_pix, eps = ctx.config
        dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
        _launch_patch_norm_mse(pred, target, mask, patch_size, norm_pix, eps, count, dloss=dloss, dpred=dpred)
        return dpred, None, None, None, None, None


def patch_norm_mse_triton(pred, target, mask, patch_size, norm_pix=True, eps=1e-6):
    """Triton version of `patch_norm_mse_reference` (same contract); differentiable in pred."""
    return _PatchNormMSE.apply(pred, target, mask, patch_size, norm_pix, eps)
