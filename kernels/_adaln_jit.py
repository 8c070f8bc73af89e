"""The Triton kernels of adaln.py (see the comment there); imported on their first launch only."""
import triton
import triton.language as tl


@triton.jit
def _row_stats(x, ok, D, eps):
    """Centred row values (zero outside the row) and 1/std of a [ROWS, BLOCK_D] tile, LayerNorm-style."""
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    return centred, rstd


@triton.jit
def _adaln_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    T, D, rows_per_program, s_gate, s_shift, s_scale, eps,
    RESIDUAL: tl.constexpr, LN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t_start = tl.program_id(1) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if RESIDUAL:
        gate = tl.load(gate_ptr + b * s_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
    if LN:
        shift = tl.load(shift_ptr + b * s_shift + cols, mask=col_ok, other=0.0).to(tl.float32)
        scale1 = 1.0 + tl.load(scale_ptr + b * s_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_B:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)

    for t0 in range(t_start, t_end, ROWS):
        t = t0 + tl.arange(0, ROWS)
        ok = (t < t_end)[:, None] & col_ok[None, :]
        off = (b * T + t)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if RESIDUAL:
            y = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
            x1 = (x + gate[None, :] * y).to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + off, x1, mask=ok)
            x = x1.to(tl.float32)  # normalise the residual exactly as returned to the caller
        if LN:
            centred, rstd = _row_stats(x, ok, D, eps)
            h = centred * rstd[:, None]
            if HAS_W:
                h = h * w[None, :]
            if HAS_B:
                h = h + bias[None, :]
            out = h * scale1[None, :] + shift[None, :]
            tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _adaln_bwd_kernel(
    x_ptr, dout_ptr, y_ptr, gate_ptr, dres_ptr, scale_ptr, w_ptr, dx_ptr, dy_ptr, part_ptr,
    B, T, D, rows_per_program, s_gate, s_scale, eps,
    RESIDUAL: tl.constexpr, LN: tl.constexpr, HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # x: the LayerNorm input (x, or x1 of the fused op); dout: grad of the modulated output; dres: grad of the
    # residual output (x1). dx is written when LN (for gate_residual alone it is dres itself).
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = pid_b.to(tl.int64)
    t_start = pid_c * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if RESIDUAL:
        gate = tl.load(gate_ptr + b * s_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
    if LN:
        scale1 = 1.0 + tl.load(scale_ptr + b * s_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_W:
            scale1 = scale1 * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # 2-D accumulators: one cross-row reduction at the end instead of one per tile
    acc_a = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    acc_s = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    acc_g = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)

    for t0 in range(t_start, t_end, ROWS):
        t = t0 + tl.arange(0, ROWS)
        ok = (t < t_end)[:, None] & col_ok[None, :]
        off = (b * T + t)[:, None] * D + cols[None, :]
        if RESIDUAL:
            dx = tl.load(dres_ptr + off, mask=ok, other=0.0).to(tl.float32)
        else:
            dx = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        if LN:
            x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
            centred, rstd = _row_stats(x, ok, D, eps)
            xhat = centred * rstd[:, None]
            dout = tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32)
            acc_a += dout * xhat
            acc_s += dout
            dxhat = dout * scale1[None, :]
            mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / D
            mean_dxhat = tl.sum(dxhat, axis=1) / D
            dx += tl.where(ok, (dxhat - xhat * mean_dxhat_xhat[:, None] - mean_dxhat[:, None]) * rstd[:, None], 0.0)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if RESIDUAL:
            y = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
            acc_g += dx * y
            tl.store(dy_ptr + off, (dx * gate[None, :]).to(dy_ptr.dtype.element_ty), mask=ok)

    slab = B * tl.num_programs(1) * D  # partials: [3, B, chunks, D]
    part = part_ptr + (b * tl.num_programs(1) + pid_c) * D + cols
    if LN:
        tl.store(part, tl.sum(acc_a, axis=0), mask=col_ok)
        tl.store(part + slab, tl.sum(acc_s, axis=0), mask=col_ok)
    if RESIDUAL:
        tl.store(part + 2 * slab, tl.sum(acc_g, axis=0), mask=col_ok)


@triton.jit
def _adaln_finalize_kernel(
    part_ptr, scale_ptr, w_ptr, bias_ptr, dshift_ptr, dscale_ptr, dgate_ptr, dw_part_ptr, db_part_ptr,
    B, D, chunks, s_scale,
    RESIDUAL: tl.constexpr, LN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ok = (bs < B)[:, None] & col_ok[None, :]
    slab = B * chunks * D
    sum_a = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    sum_s = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for c in range(0, chunks):
        off = (bs.to(tl.int64) * chunks + c)[:, None] * D + cols[None, :]
        if LN:
            sum_a += tl.load(part_ptr + off, mask=ok, other=0.0)
            sum_s += tl.load(part_ptr + slab + off, mask=ok, other=0.0)
        if RESIDUAL:
            sum_g += tl.load(part_ptr + 2 * slab + off, mask=ok, other=0.0)

    out_off = bs.to(tl.int64)[:, None] * D + cols[None, :]
    if RESIDUAL:
        tl.store(dgate_ptr + out_off, sum_g.to(dgate_ptr.dtype.element_ty), mask=ok)
    if LN:
        tl.store(dshift_ptr + out_off, sum_s.to(dshift_ptr.dtype.element_ty), mask=ok)
        dscale = sum_a
        if HAS_W:
            dscale = dscale * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            dscale += sum_s * tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(dscale_ptr + out_off, dscale.to(dscale_ptr.dtype.element_ty), mask=ok)
        if HAS_W or HAS_B:
            scale1 = 1.0 + tl.load(scale_ptr + bs.to(tl.int64)[:, None] * s_scale + cols[None, :],
                                   mask=ok, other=0.0).to(tl.float32)
            if HAS_W:
                tl.store(dw_part_ptr + pid_b * D + cols, tl.sum(scale1 * sum_a, axis=0), mask=col_ok)
            if HAS_B:
                tl.store(db_part_ptr + pid_b * D + cols, tl.sum(scale1 * sum_s, axis=0), mask=col_ok)
