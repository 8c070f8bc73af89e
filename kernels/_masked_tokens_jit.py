"""The Triton kernel of masked_tokens.py (see the comment there); imported on its first launch only. The source is
read through all three of its strides (a transposed patch-embedding output needs no copy)."""
import triton
import triton.language as tl


@triton.jit
def _move_rows_kernel(
    out_ptr, src_ptr, ids_ptr, pos_ptr, fill_ptr, row_sum_ptr, masked_sum_ptr,
    B, R, D, P, n_valid, batches_per_program,
    s_out_b, s_out_r, s_src_b, s_src_r, s_src_d, s_ids_b,
    SCATTER: tl.constexpr, HAS_POS: tl.constexpr, POS_BY_SOURCE: tl.constexpr, HAS_FILL: tl.constexpr,
    ROW_SUM: tl.constexpr, MASKED_SUM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    r = pid_r * ROWS + tl.arange(0, ROWS)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = r < R
    col_ok = cols < D
    tile_ok = row_ok[:, None] & col_ok[None, :]
    is_prefix = r < P

    if HAS_FILL:
        fill = tl.load(fill_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    row_acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    masked_acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)

    b_start = pid_b * batches_per_program
    n_batches = tl.minimum(batches_per_program, B - b_start)
    for i in range(0, n_batches):
        b64 = b_start.to(tl.int64) + i
        ids = tl.load(ids_ptr + b64 * s_ids_b + (r - P), mask=row_ok & ~is_prefix, other=0).to(tl.int64)
        c = tl.where(is_prefix, r.to(tl.int64), P + ids)
        valid = row_ok & (is_prefix | (ids < n_valid))
        valid_tile = valid[:, None] & col_ok[None, :]
        if SCATTER:
            vals = tl.load(src_ptr + b64 * s_src_b + r[:, None].to(tl.int64) * s_src_r + cols[None, :] * s_src_d,
                           mask=tile_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + b64 * s_out_b + c[:, None] * s_out_r + cols[None, :],
                     vals.to(out_ptr.dtype.element_ty), mask=valid_tile)
        else:
            vals = tl.load(src_ptr + b64 * s_src_b + c[:, None] * s_src_r + cols[None, :] * s_src_d,
                           mask=valid_tile, other=0.0).to(tl.float32)
            if HAS_FILL:
                vals = tl.where(valid[:, None], vals, fill[None, :])
            if HAS_POS:
                pos_row = c if POS_BY_SOURCE else r.to(tl.int64)
                vals += tl.load(pos_ptr + pos_row[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            vals = vals.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + b64 * s_out_b + r[:, None].to(tl.int64) * s_out_r + cols[None, :], vals, mask=tile_ok)
            vals = vals.to(tl.float32)
        if ROW_SUM:
            row_acc += vals
        if MASKED_SUM:
            masked_acc += tl.where(valid_tile, 0.0, vals)

    if ROW_SUM:  # partial [programs along the batch, R, D]
        part = row_sum_ptr + pid_b.to(tl.int64) * R * D
        tl.store(part + r[:, None] * D + cols[None, :], row_acc, mask=tile_ok)
    if MASKED_SUM:  # partial [programs along the batch, row blocks, D]
        part = masked_sum_ptr + (pid_b * tl.num_programs(0) + pid_r).to(tl.int64) * D
        tl.store(part + cols, tl.sum(masked_acc, axis=0), mask=col_ok)
