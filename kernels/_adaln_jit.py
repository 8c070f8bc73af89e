"""The Triton kernels of adaln.py (see the comment there); imported on their first launch only.

A row of width D is handled as two column blocks, a power-of-two main block A <= D and a tail block T covering
the rest (1152 = 1024 + 128, 768 = 512 + 256, 384 = 256 + 128): no lanes wasted on padding D up to the next
power of two. Programs walk their token rows one at a time, so every per-row value and every accumulator is a
1-D vector over the columns; the walk is software-pipelined (`tl.range(..., num_stages=NUM_STAGES)`, 2 in
bf16/fp16, 1 in fp32): the next row's loads are in flight (cp.async into shared memory, for unit-stride rows) while
the current row is reduced and stored, instead of each row waiting out a full memory latency (the compile gate
shows the staging buffers in `shared_bytes`). Inputs are read through their strides (a transposed
patch-embedding output needs no copy); outputs are contiguous.
"""
import triton
import triton.language as tl


@triton.jit
def _load_pair(ptr, off, s_d, cols_a, cols_t, ok_a, ok_t):
    """One row's two column blocks at element offset `off` with column stride s_d, as fp32 (0 where masked)."""
    a = tl.load(ptr + off + cols_a * s_d, mask=ok_a, other=0.0).to(tl.float32)
    t = tl.load(ptr + off + cols_t * s_d, mask=ok_t, other=0.0).to(tl.float32)
    return a, t


@triton.jit
def _store_pair(ptr, off, a, t, cols_a, cols_t, ok_a, ok_t):
    tl.store(ptr + off + cols_a, a.to(ptr.dtype.element_ty), mask=ok_a)
    tl.store(ptr + off + cols_t, t.to(ptr.dtype.element_ty), mask=ok_t)


@triton.jit
def _normalise_pair(a, t, ok_a, ok_t, D, eps):
    """LayerNorm of one row held as two blocks -> (xhat_a, xhat_t, 1/std); zero outside the row."""
    mean = (tl.sum(a, axis=0) + tl.sum(t, axis=0)) / D
    ca = tl.where(ok_a, a - mean, 0.0)
    ct = tl.where(ok_t, t - mean, 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(ca * ca, axis=0) + tl.sum(ct * ct, axis=0)) / D + eps)
    return ca * rstd, ct * rstd, rstd


@triton.jit
def _adaln_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    T, D, rows_per_program, s_xb, s_xt, s_xd, s_yb, s_yt, s_yd, s_gate, s_shift, s_scale, eps,
    RESIDUAL: tl.constexpr, LN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t_start = tl.program_id(1) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    cols_a = tl.arange(0, BLOCK_A)
    cols_t = BLOCK_A + tl.arange(0, BLOCK_T)
    ok_a, ok_t = cols_a < D, cols_t < D
    if RESIDUAL:
        gate_a, gate_t = _load_pair(gate_ptr, b * s_gate, 1, cols_a, cols_t, ok_a, ok_t)
    if LN:
        shift_a, shift_t = _load_pair(shift_ptr, b * s_shift, 1, cols_a, cols_t, ok_a, ok_t)
        scale_a, scale_t = _load_pair(scale_ptr, b * s_scale, 1, cols_a, cols_t, ok_a, ok_t)
        if HAS_W:
            w_a, w_t = _load_pair(w_ptr, 0, 1, cols_a, cols_t, ok_a, ok_t)
        if HAS_B:
            bias_a, bias_t = _load_pair(bias_ptr, 0, 1, cols_a, cols_t, ok_a, ok_t)

    for t in tl.range(t_start, t_end, num_stages=NUM_STAGES):
        out_off = (b * T + t) * D
        x_a, x_t = _load_pair(x_ptr, b * s_xb + t * s_xt, s_xd, cols_a, cols_t, ok_a, ok_t)
        if RESIDUAL:
            y_a, y_t = _load_pair(y_ptr, b * s_yb + t * s_yt, s_yd, cols_a, cols_t, ok_a, ok_t)
            # normalise the residual exactly as returned to the caller (rounded to its dtype)
            x_a = (x_a + gate_a * y_a).to(res_ptr.dtype.element_ty).to(tl.float32)
            x_t = (x_t + gate_t * y_t).to(res_ptr.dtype.element_ty).to(tl.float32)
            _store_pair(res_ptr, out_off, x_a, x_t, cols_a, cols_t, ok_a, ok_t)
        if LN:
            h_a, h_t, _ = _normalise_pair(x_a, x_t, ok_a, ok_t, D, eps)
            if HAS_W:
                h_a, h_t = h_a * w_a, h_t * w_t
            if HAS_B:
                h_a, h_t = h_a + bias_a, h_t + bias_t
            _store_pair(out_ptr, out_off, h_a * (1.0 + scale_a) + shift_a, h_t * (1.0 + scale_t) + shift_t,
                        cols_a, cols_t, ok_a, ok_t)


@triton.jit
def _adaln_bwd_kernel(
    x_ptr, dout_ptr, y_ptr, gate_ptr, dres_ptr, scale_ptr, w_ptr, dx_ptr, dy_ptr, part_ptr,
    B, T, D, rows_per_program, s_xb, s_xt, s_xd, s_ob, s_ot, s_od, s_yb, s_yt, s_yd, s_rb, s_rt, s_rd,
    s_gate, s_scale, eps,
    RESIDUAL: tl.constexpr, LN: tl.constexpr, HAS_W: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # x: the LayerNorm input (x, or x1 of the fused op); dout: grad of the modulated output; dres: grad of the
    # residual output (x1). dx is written when LN (for gate_residual alone it is dres itself).
    pid_c = tl.program_id(1)
    b = tl.program_id(0).to(tl.int64)
    t_start = pid_c * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    cols_a = tl.arange(0, BLOCK_A)
    cols_t = BLOCK_A + tl.arange(0, BLOCK_T)
    ok_a, ok_t = cols_a < D, cols_t < D
    if RESIDUAL:
        gate_a, gate_t = _load_pair(gate_ptr, b * s_gate, 1, cols_a, cols_t, ok_a, ok_t)
    if LN:
        g_a, g_t = _load_pair(scale_ptr, b * s_scale, 1, cols_a, cols_t, ok_a, ok_t)
        g_a, g_t = 1.0 + g_a, 1.0 + g_t  # d(out)/d(xhat) per column: (1 + scale) * w
        if HAS_W:
            w_a, w_t = _load_pair(w_ptr, 0, 1, cols_a, cols_t, ok_a, ok_t)
            g_a, g_t = g_a * w_a, g_t * w_t
    # 1-D column accumulators: A = sum_t dout * xhat, S = sum_t dout, G = sum_t dx1 * y
    acc_a_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
    acc_a_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc_s_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
    acc_s_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc_g_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
    acc_g_t = tl.zeros((BLOCK_T,), dtype=tl.float32)

    for t in tl.range(t_start, t_end, num_stages=NUM_STAGES):
        out_off = (b * T + t) * D
        if RESIDUAL:
            dx_a, dx_t = _load_pair(dres_ptr, b * s_rb + t * s_rt, s_rd, cols_a, cols_t, ok_a, ok_t)
        else:
            dx_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
            dx_t = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if LN:
            x_a, x_t = _load_pair(x_ptr, b * s_xb + t * s_xt, s_xd, cols_a, cols_t, ok_a, ok_t)
            xhat_a, xhat_t, rstd = _normalise_pair(x_a, x_t, ok_a, ok_t, D, eps)
            do_a, do_t = _load_pair(dout_ptr, b * s_ob + t * s_ot, s_od, cols_a, cols_t, ok_a, ok_t)
            acc_a_a += do_a * xhat_a
            acc_a_t += do_t * xhat_t
            acc_s_a += do_a
            acc_s_t += do_t
            dxhat_a, dxhat_t = do_a * g_a, do_t * g_t
            mean_dxhat_xhat = (tl.sum(dxhat_a * xhat_a, axis=0) + tl.sum(dxhat_t * xhat_t, axis=0)) / D
            mean_dxhat = (tl.sum(dxhat_a, axis=0) + tl.sum(dxhat_t, axis=0)) / D
            dx_a += tl.where(ok_a, (dxhat_a - xhat_a * mean_dxhat_xhat - mean_dxhat) * rstd, 0.0)
            dx_t += tl.where(ok_t, (dxhat_t - xhat_t * mean_dxhat_xhat - mean_dxhat) * rstd, 0.0)
            _store_pair(dx_ptr, out_off, dx_a, dx_t, cols_a, cols_t, ok_a, ok_t)
        if RESIDUAL:
            y_a, y_t = _load_pair(y_ptr, b * s_yb + t * s_yt, s_yd, cols_a, cols_t, ok_a, ok_t)
            acc_g_a += dx_a * y_a
            acc_g_t += dx_t * y_t
            _store_pair(dy_ptr, out_off, dx_a * gate_a, dx_t * gate_t, cols_a, cols_t, ok_a, ok_t)

    slab = B * tl.num_programs(1) * D  # partials: [3, B, chunks, D]
    part = (b * tl.num_programs(1) + pid_c) * D
    if LN:
        _store_pair(part_ptr, part, acc_a_a, acc_a_t, cols_a, cols_t, ok_a, ok_t)
        _store_pair(part_ptr, part + slab, acc_s_a, acc_s_t, cols_a, cols_t, ok_a, ok_t)
    if RESIDUAL:
        _store_pair(part_ptr, part + 2 * slab, acc_g_a, acc_g_t, cols_a, cols_t, ok_a, ok_t)


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
