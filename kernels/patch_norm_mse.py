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


# ---------------------------------------------------------------------------------------------------------------
# Triton path: each program takes a block of patches, reads their target values straight out of the [B, C, H, W]
# latents through its strides (no patchified copy), normalises them in registers and writes one partial loss sum
# and one partial mask count; the partials are summed in a fixed order. The backward recomputes the normalised
# target (cheaper than storing it) and writes d(pred) only.
# ---------------------------------------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import _triton_utils as tu  # noqa: E402

# Patches per program: ~1K elements keeps many programs in flight for the small decoder head.
_PATCH_TILE_ELEMENTS = 1024


@triton.jit
def _patch_norm_mse_kernel(
    pred_ptr, target_ptr, mask_ptr, coef_ptr, loss_part_ptr, mask_part_ptr, dpred_ptr,
    n_patches, L, grid_w, N, C,
    s_pred_b, s_pred_l, s_t_b, s_t_c, s_t_h, s_t_w, eps,
    P: tl.constexpr, NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    e = tl.arange(0, BLOCK_N)
    row_ok = rows < n_patches
    ok = row_ok[:, None] & (e < N)[None, :]

    b = (rows // L).to(tl.int64)
    l = rows % L
    h0 = (l // grid_w) * P
    w0 = (l % grid_w) * P
    # element e of a patch row is (p_row, p_col, channel), channel fastest, as `patchify` lays it out
    p_row = e // (P * C)
    p_col = (e // C) % P
    chan = e % C
    t_off = (b * s_t_b + h0.to(tl.int64) * s_t_h + w0.to(tl.int64) * s_t_w)[:, None] \
        + (chan.to(tl.int64) * s_t_c + p_row * s_t_h + p_col * s_t_w)[None, :]
    t = tl.load(target_ptr + t_off, mask=ok, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / N
        centred = tl.where(ok, t - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (N - 1)
        t = centred / tl.sqrt(var + eps)[:, None]

    pred_off = (b * s_pred_b + l.to(tl.int64) * s_pred_l)[:, None] + e[None, :]
    pred = tl.load(pred_ptr + pred_off, mask=ok, other=0.0).to(tl.float32)
    diff = tl.where(ok, pred - t, 0.0)
    m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if BACKWARD:
        coef = tl.load(coef_ptr)  # d(loss) * 2 / (N * number of masked patches)
        dpred = diff * (m * coef)[:, None]
        tl.store(dpred_ptr + rows.to(tl.int64)[:, None] * N + e[None, :], dpred.to(dpred_ptr.dtype.element_ty), mask=ok)
    else:
        per_patch = tl.sum(diff * diff, axis=1) / N
        tl.store(loss_part_ptr + pid, tl.sum(per_patch * m, axis=0))
        tl.store(mask_part_ptr + pid, tl.sum(m, axis=0))


def _launch_patch_norm_mse(pred, target, mask, patch_size, norm_pix, eps, coef=None, dpred=None):
    B, L, N = pred.shape
    C, W = target.shape[1], target.shape[3]
    block_n = tu.next_pow2(N)
    rows = min(max(1, _PATCH_TILE_ELEMENTS // block_n), tu.next_pow2(B * L))
    programs = tu.cdiv(B * L, rows)
    backward = dpred is not None
    if backward:
        loss_part = mask_part = coef
    else:
        loss_part = torch.empty(programs, dtype=torch.float32, device=pred.device)
        mask_part = torch.empty(programs, dtype=torch.float32, device=pred.device)
    _patch_norm_mse_kernel[(programs,)](
        pred, target, mask, coef if backward else pred, loss_part, mask_part, dpred if backward else pred,
        B * L, L, W // patch_size, N, C,
        pred.stride(0), pred.stride(1), *target.stride(), eps,
        P=patch_size, NORM_PIX=norm_pix, BACKWARD=backward, ROWS=rows, BLOCK_N=block_n,
        num_warps=tu.num_warps_for(rows * block_n),
    )
    return loss_part, mask_part


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
        mask = mask.contiguous() if mask.is_floating_point() else mask.float().contiguous()
        loss_part, mask_part = _launch_patch_norm_mse(pred, target, mask, patch_size, norm_pix, eps)
        masked = mask_part.sum()
        ctx.save_for_backward(pred, target, mask, masked)
        ctx.config = (patch_size, norm_pix, eps)
        return loss_part.sum() / masked

    @staticmethod
    def backward(ctx, dloss):
        pred, target, mask, masked = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        patch_size, norm_pix, eps = ctx.config
        coef = (dloss.float() * 2 / (pred.shape[2] * masked)).reshape(1)
        dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
        _launch_patch_norm_mse(pred, target, mask, patch_size, norm_pix, eps, coef=coef, dpred=dpred)
        return dpred, None, None, None, None, None


def patch_norm_mse_triton(pred, target, mask, patch_size, norm_pix=True, eps=1e-6):
    """Triton version of `patch_norm_mse_reference` (same contract); differentiable in pred."""
    return _PatchNormMSE.apply(pred, target, mask, patch_size, norm_pix, eps)
