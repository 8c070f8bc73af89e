"""Masked-token ops of MAE-style pretraining.

keep_gather: pick the visible tokens of each row (optionally adding the pos-emb in the same pass).
unshuffle:   put the encoder's visible tokens back in image order, filling masked places with the mask token
             (optionally adding the decoder pos-emb), with `num_prefix` leading tokens (cls) passed through.

Index contract (set by the model's random masking):
  ids_keep    [B, K] int64, unique per row, values in [0, L): the visible patches, in shuffled order.
  ids_restore [B, L] int64, a permutation per row: patch l sits at shuffled position ids_restore[b, l];
              positions >= K are masked.
"""
import torch

from . import _triton_utils as tu


def _check_index(name, ids, batch, upper):
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(f"{name}: expected an int32/int64 tensor [B={batch}, N], got {tuple(ids.shape)} {ids.dtype}")


def keep_gather_reference(x, ids_keep, pos=None):
    """x [B, L, D], ids_keep [B, K], pos [L, D] or None -> x_vis [B, K, D] (= (x + pos)[b, ids_keep[b]])."""
    B, L, D = x.shape
    _check_index("keep_gather ids_keep", ids_keep, B, L)
    rows = torch.arange(B, device=x.device)[:, None]
    out = x[rows, ids_keep]
    if pos is not None:
        out = out + pos[ids_keep].to(out.dtype)
    return out


def unshuffle_reference(y, mask_token, ids_restore, pos=None, num_prefix=0):
    """y [B, P+K, D] (P = num_prefix leading tokens, passed through), mask_token [D],
    ids_restore [B, L], pos [P+L, D] or None -> [B, P+L, D]."""
    B, PK, D = y.shape
    L = ids_restore.shape[1]
    _check_index("unshuffle ids_restore", ids_restore, B, L)
    K = PK - num_prefix
    visible = y[:, num_prefix:]
    full = torch.cat([visible, mask_token.to(y.dtype).view(1, 1, D).expand(B, L - K, D)], dim=1)
    rows = torch.arange(B, device=y.device)[:, None]
    out = torch.cat([y[:, :num_prefix], full[rows, ids_restore]], dim=1)
    if pos is not None:
        out = out + pos.to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Triton path. One row-moving kernel serves both ops in both directions: it walks "index rows" r of each batch row
# b, maps r to a row c of the compact side (c = r for the P prefix rows, else c = P + ids[b, r - P], valid when
# ids < n_valid) and either gathers (out[b, r] = src[b, c], or the fill / zero where invalid) or scatters
# (out[b, c] = src[b, r] where valid). The batch is walked inside each program so that the pos-emb and mask-token
# gradients come out as per-program partial sums, reduced afterwards in a fixed order (no atomics).
#   keep_gather fwd:  r over K kept rows, ids = ids_keep, gather, pos by source row
#   keep_gather bwd:  r over L rows, ids = inverse of ids_keep (K where dropped), gather (zeros), d(pos) = sum_b
#   unshuffle fwd:    r over P+L rows, ids = ids_restore, gather with the mask token as fill, pos by output row
#   unshuffle bwd:    r over P+L rows, ids = ids_restore, scatter into d(y), d(pos) = sum_b, d(mask) = masked sum
# The @triton.jit kernel is in _masked_tokens_jit.py, imported at the first launch: this module needs no triton.
# ---------------------------------------------------------------------------------------------------------------


def _move_rows(out, src, ids, *, rows, prefix, n_valid, scatter=False, pos=None, pos_by_source=False, fill=None,
               row_sum=False, masked_sum=False):
    """Launch `_move_rows_kernel` over `rows` index rows per batch row. Returns the fp32 partials
    (row sums [n, rows, D], masked sums [n, row blocks, D]) that were asked for, else None."""
    from ._masked_tokens_jit import _move_rows_kernel  # the first launch imports triton

    B, D = src.shape[0], src.shape[2]
    block_d = tu.col_block(D)
    tile_rows = min(tu.rows_per_tile(block_d), tu.next_pow2(rows))
    grid_rows, grid_cols = tu.cdiv(rows, tile_rows), tu.cdiv(D, block_d)
    if row_sum or masked_sum:  # split the batch only as far as needed to fill the device
        splits = min(B, max(1, tu.cdiv(tu.target_programs(src.device), grid_rows * grid_cols)))
    else:
        splits = B
    batches_per_program = tu.cdiv(B, splits)
    splits = tu.cdiv(B, batches_per_program)
    f32 = dict(dtype=torch.float32, device=src.device)
    row_part = torch.empty(splits, rows, D, **f32) if row_sum else None
    masked_part = torch.empty(splits, grid_rows, D, **f32) if masked_sum else None
    _move_rows_kernel[(grid_rows, grid_cols, splits)](
        out, src, ids, pos if pos is not None else src, fill if fill is not None else src,
        row_part if row_sum else out, masked_part if masked_sum else out,
        B, rows, D, prefix, n_valid, batches_per_program,
        out.stride(0), out.stride(1), *src.stride(), ids.stride(0),
        SCATTER=scatter, HAS_POS=pos is not None, POS_BY_SOURCE=pos_by_source, HAS_FILL=fill is not None,
        ROW_SUM=row_sum, MASKED_SUM=masked_sum, ROWS=tile_rows, BLOCK_D=block_d,
        num_warps=tu.num_warps_for(tile_rows * block_d),
    )
    return row_part, masked_part


def _check_pos(name, pos, rows, D):
    if pos is not None and tuple(pos.shape) != (rows, D):
        raise ValueError(f"{name}: pos must be [{rows}, {D}], got {tuple(pos.shape)}")


class _KeepGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, pos):
        B, L, D = x.shape
        _check_index("keep_gather ids_keep", ids_keep, B, L)
        _check_pos("keep_gather", pos, L, D)
        tu.check_same_device("keep_gather", x, ids_keep, pos)
        ids_keep = ids_keep.contiguous()
        pos = pos.contiguous() if pos is not None else None
        K = ids_keep.shape[1]
        out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)
        _move_rows(out, x, ids_keep, rows=K, prefix=0, n_valid=L, pos=pos, pos_by_source=True)
        ctx.save_for_backward(ids_keep)
        ctx.x_shape = (B, L, D)
        ctx.x_dtype = x.dtype
        ctx.pos_dtype = pos.dtype if pos is not None else None
        return out

    @staticmethod
    def backward(ctx, dout):
        (ids_keep,) = ctx.saved_tensors
        need_dx, _, need_dpos = ctx.needs_input_grad
        if not (need_dx or need_dpos):
            return None, None, None
        B, L, D = ctx.x_shape
        K = ids_keep.shape[1]
        # inverse map: which kept slot each patch went to, K (= not kept) elsewhere; [B, L], no D expansion
        slot = torch.full((B, L), K, dtype=torch.int64, device=dout.device)
        slot.scatter_(1, ids_keep.long(), torch.arange(K, device=dout.device).expand(B, K))
        dx = torch.empty(B, L, D, dtype=ctx.x_dtype, device=dout.device)
        row_part, _ = _move_rows(dx, dout, slot, rows=L, prefix=0, n_valid=K, row_sum=need_dpos)
        dpos = row_part.sum(0).to(ctx.pos_dtype) if need_dpos else None
        return (dx if need_dx else None), None, dpos


class _Unshuffle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mask_token, ids_restore, pos, num_prefix):
        B, PK, D = y.shape
        L = ids_restore.shape[1]
        _check_index("unshuffle ids_restore", ids_restore, B, L)
        _check_pos("unshuffle", pos, num_prefix + L, D)
        if mask_token.numel() != D:
            raise ValueError(f"unshuffle: mask_token must have {D} elements, got {tuple(mask_token.shape)}")
        tu.check_same_device("unshuffle", y, mask_token, ids_restore, pos)
        K = PK - num_prefix
        if not 0 <= K <= L:
            raise ValueError(f"unshuffle: {PK} tokens with {num_prefix} prefix give {K} visible of {L}")
        ids_restore = ids_restore.contiguous()
        pos = pos.contiguous() if pos is not None else None
        out = torch.empty(B, num_prefix + L, D, dtype=y.dtype, device=y.device)
        _move_rows(out, y, ids_restore, rows=num_prefix + L, prefix=num_prefix, n_valid=K, pos=pos,
                   fill=mask_token.reshape(D).contiguous())
        ctx.save_for_backward(ids_restore)
        ctx.meta = (PK, y.dtype, mask_token.shape, mask_token.dtype, pos.dtype if pos is not None else None)
        ctx.num_prefix = num_prefix
        return out

    @staticmethod
    def backward(ctx, dout):
        (ids_restore,) = ctx.saved_tensors
        need_dy, need_dmask, _, need_dpos, _ = ctx.needs_input_grad
        if not (need_dy or need_dmask or need_dpos):
            return None, None, None, None, None
        PK, y_dtype, mask_shape, mask_dtype, pos_dtype = ctx.meta
        P = ctx.num_prefix
        B, PL, D = dout.shape
        # every visible slot receives exactly one row, so d(y) needs no initialisation
        dy = torch.empty(B, PK, D, dtype=y_dtype, device=dout.device)
        row_part, masked_part = _move_rows(dy, dout, ids_restore, rows=PL, prefix=P, n_valid=PK - P, scatter=True,
                                           row_sum=need_dpos, masked_sum=need_dmask)
        dmask = masked_part.sum((0, 1)).to(mask_dtype).reshape(mask_shape) if need_dmask else None
        dpos = row_part.sum(0).to(pos_dtype) if need_dpos else None
        return (dy if need_dy else None), dmask, None, dpos, None


def keep_gather_triton(x, ids_keep, pos=None):
    """Triton version of `keep_gather_reference` (same contract); differentiable in x and pos."""
    return _KeepGather.apply(x, ids_keep, pos)


def unshuffle_triton(y, mask_token, ids_restore, pos=None, num_prefix=0):
    """Triton version of `unshuffle_reference` (same contract); differentiable in y, mask_token and pos."""
    return _Unshuffle.apply(y, mask_token, ids_restore, pos, num_prefix)
