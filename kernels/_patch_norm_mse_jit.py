"""The Triton kernel of patch_norm_mse.py (see the comment there); imported on its first launch only."""
import triton
import triton.language as tl


@triton.jit
def _patch_norm_mse_kernel(
    pred_ptr, target_ptr, mask_ptr, dloss_ptr, loss_ptr, count_ptr, part_ptr, counter_ptr, dpred_ptr,
    n_patches, L, grid_w, N, C,
    s_pred_b, s_pred_l, s_t_b, s_t_c, s_t_h, s_t_w, eps,
    P: tl.constexpr, NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
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
    m = tl.load(mask_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    if BACKWARD:
        # d(loss) * 2 / (N * number of masked patches), from the forward's stats: no separate launch
        coef = tl.load(dloss_ptr).to(tl.float32) * 2.0 / (N * tl.load(count_ptr))
        dpred = diff * (m * coef)[:, None]
        tl.store(dpred_ptr + rows.to(tl.int64)[:, None] * N + e[None, :], dpred.to(dpred_ptr.dtype.element_ty), mask=ok)
    else:
        per_patch = tl.sum(diff * diff, axis=1) / N
        n_programs = tl.num_programs(0)
        tl.store(part_ptr + pid, tl.sum(per_patch * m, axis=0))
        tl.store(part_ptr + n_programs + pid, tl.sum(m, axis=0))
        # The last program to finish sums every partial in program order (fixed, so the loss is bitwise
        # repeatable) and writes the loss and the masked count; the acq_rel counter makes the others' partials visible.
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if done == n_programs - 1:
            loss_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
            mask_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
            for start in range(0, n_programs, BLOCK_P):
                i = start + tl.arange(0, BLOCK_P)
                loss_acc += tl.load(part_ptr + i, mask=i < n_programs, other=0.0, cache_modifier=".cg")
                mask_acc += tl.load(part_ptr + n_programs + i, mask=i < n_programs, other=0.0, cache_modifier=".cg")
            masked = tl.sum(mask_acc, axis=0)
            tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / masked)
            tl.store(count_ptr, masked)
            tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch on this device
