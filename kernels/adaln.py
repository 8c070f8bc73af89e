"""LayerNorm + AdaLN modulation and the gated residual of DiT/SiT blocks.

ln_modulate:               y = LN(x; eps, optional weight/bias) * (1 + scale[b]) + shift[b]
gate_residual:             x + gate[b] * y
gate_residual_ln_modulate: (x1, LN(x1) modulated) with x1 = x + gate[b] * y: the residual of one branch fused
                           with the norm of the next, the pattern of an adaLN-Zero block.
Shapes: x, y [B, T, D]; shift, scale, gate [B, D]; weight, bias [D] or None (None: DiT's affine-free LN,
given: USP's restored LayerNorm).
"""
import torch
import torch.nn.functional as F

from . import _triton_utils as tu


def ln_modulate_reference(x, shift, scale, weight=None, bias=None, eps=1e-6):
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gate_residual_reference(x, gate, y):
    return x + gate.unsqueeze(1) * y


def gate_residual_ln_modulate_reference(x, gate, y, shift, scale, weight=None, bias=None, eps=1e-6):
    x1 = gate_residual_reference(x, gate, y)
    return x1, ln_modulate_reference(x1, shift, scale, weight, bias, eps)


# ---------------------------------------------------------------------------------------------------------------
# Triton path. One forward and one backward kernel serve all three ops (constexpr RESIDUAL / LN switches). A
# program owns one batch row b and a chunk of its tokens, so the per-sample vectors (shift, scale, gate) are loaded
# once, and walks its token rows one at a time (LayerNorm needs the full row) as a power-of-two main block plus a
# tail block (1152 = 1024 + 128: no padding to 2048), with 1-D column accumulators. In bf16/fp16 the walk is
# software-pipelined (_pipeline_stages): the next row's loads are in flight while the current row computes, so a
# program does not wait out a full memory latency per row. The chunking launches at most about the launch table's
# programs per SM (one wave: at b256, 3 chunks per batch row would make 768 programs, 1.45 waves of 4 resident per
# SM over 132 SMs; 2 make 512, one). Inputs and incoming gradients are read through their strides: no
# `.contiguous()` copy of a full activation.
# Backward reductions stay deterministic without atomics: each program writes fp32 partials
#   A = sum_t dout * xhat,  S = sum_t dout,  G = sum_t dx1 * y    ([B, chunks, D] each)
# and a small finalize kernel sums them over chunks in a fixed order (its batch blocks sized so that its grid has at
# least one program per SM: 144 programs at b32 and at b256 for D=1152, not 18 at b32), giving
#   d(shift) = S,  d(scale) = A * w + S * bias,  d(gate) = G,  and per batch block (1 + scale) * A and
#   (1 + scale) * S, whose sums over blocks are d(weight) and d(bias).
# Launch sizes (warps, programs per SM) come from the committed table in _triton_utils, looked up by (op, D, dtype)
# and the launch's rows B x T (no runtime autotuning: the chunking fixes the reduction order, so results are
# bitwise repeatable).
# The @triton.jit kernels are in _adaln_jit.py, imported at the first launch: this module needs no triton.
# ---------------------------------------------------------------------------------------------------------------

_FINALIZE_BLOCK_B = 16  # batch rows per finalize program, at most


def _pipeline_stages(dtype):
    """Rows in flight per program in the forward and backward walks: 2 for 16-bit activations; 1 (no pipelining)
    for fp32, whose staged rows cost twice the registers and shared memory (the fused backward then spills)."""
    return 2 if dtype.itemsize == 2 else 1


def _row_chunks(B, T, programs):
    """(rows per program, chunks per batch row) for at most about `programs` programs over B batch rows of T
    tokens (one wave of them; at least one program per batch row)."""
    chunks = max(1, min(programs // B, T))
    rows_per_program = tu.cdiv(T, chunks)
    return rows_per_program, tu.cdiv(T, rows_per_program)


def _finalize_block_b(B, col_blocks, programs):
    """Batch rows per finalize program: the most (up to _FINALIZE_BLOCK_B, a power of two) that still gives the
    grid at least `programs` programs (one per SM), else 1."""
    block = _FINALIZE_BLOCK_B
    while block > 1 and tu.cdiv(B, block) * col_blocks < programs:
        block //= 2
    return block


def _strides3(t):
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _check_adaln(name, x, y, vectors, weight, bias):
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be [B, T, D], got {tuple(x.shape)}")
    B, _, D = x.shape
    if y is not None and y.shape != x.shape:
        raise ValueError(f"{name}: y must match x {tuple(x.shape)}, got {tuple(y.shape)}")
    for label, v in vectors.items():
        if tuple(v.shape) != (B, D):
            raise ValueError(f"{name}: {label} must be [{B}, {D}], got {tuple(v.shape)}")
    for label, v in (("weight", weight), ("bias", bias)):
        if v is not None and tuple(v.shape) != (D,):
            raise ValueError(f"{name}: {label} must be [{D}], got {tuple(v.shape)}")
    tu.check_same_device(name, x, y, weight, bias, *vectors.values())


def _op_name(residual, ln):
    return "gate_residual_ln_modulate" if residual and ln else "gate_residual" if residual else "ln_modulate"


class _AdaLN(torch.autograd.Function):
    """residual: x1 = x + gate * y; ln: LN(h) * (1 + scale) + shift with h = x1 (residual) or x. Outputs
    x1 and/or the modulated norm, in that order."""

    @staticmethod
    def forward(ctx, residual, ln, x, gate, y, shift, scale, weight, bias, eps):
        from ._adaln_jit import _adaln_fwd_kernel  # the first launch imports triton

        B, T, D = x.shape
        gate = tu.unit_stride_rows(gate) if residual else None
        shift = tu.unit_stride_rows(shift) if ln else None
        scale = tu.unit_stride_rows(scale) if ln else None
        weight = weight.contiguous() if weight is not None else None  # [D]: no-ops for parameters
        bias = bias.contiguous() if bias is not None else None
        res = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if residual else None
        out = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if ln else None
        block_a, block_t = tu.split_row(D)
        cfg = tu.launch_config(f"{_op_name(residual, ln)}/fwd", D, x.dtype, block_a, rows=B * T)
        rows_per_program, chunks = _row_chunks(B, T, cfg["programs_per_sm"] * tu.sm_count(x.device))
        _adaln_fwd_kernel[(B, chunks)](
            x, y if residual else x, gate if residual else x, shift if ln else x, scale if ln else x,
            weight if weight is not None else x, bias if bias is not None else x,
            res if residual else x, out if ln else x,
            T, D, rows_per_program, *x.stride(), *_strides3(y if residual else None),
            gate.stride(0) if residual else 0, shift.stride(0) if ln else 0, scale.stride(0) if ln else 0, eps,
            RESIDUAL=residual, LN=ln, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_A=block_a, BLOCK_T=block_t, NUM_STAGES=_pipeline_stages(x.dtype), num_warps=cfg["num_warps"],
        )
        ln_input = (res if residual else x) if ln else None
        ctx.save_for_backward(ln_input, y, gate, scale, weight, bias)
        ctx.config = (residual, ln, eps)
        ctx.dtypes = tuple(v.dtype if v is not None else None for v in (x, shift))
        if residual and ln:
            return res, out
        return res if residual else out

    @staticmethod
    def backward(ctx, *grads):
        from ._adaln_jit import _adaln_bwd_kernel, _adaln_finalize_kernel

        ln_input, y, gate, scale, weight, bias = ctx.saved_tensors
        residual, ln, eps = ctx.config
        x_dtype, shift_dtype = ctx.dtypes
        dres = grads[0] if residual else None  # read through their strides, like the inputs
        dout = grads[-1] if ln else None
        B, T, D = (dres if residual else dout).shape
        device = (dres if residual else dout).device

        block_a, block_t = tu.split_row(D)
        cfg = tu.launch_config(f"{_op_name(residual, ln)}/bwd", D, x_dtype, block_a, rows=B * T)
        rows_per_program, chunks = _row_chunks(B, T, cfg["programs_per_sm"] * tu.sm_count(device))
        part = torch.empty(3, B, chunks, D, dtype=torch.float32, device=device)
        dx = torch.empty(B, T, D, dtype=x_dtype, device=device) if ln else dres
        dy = torch.empty(B, T, D, dtype=y.dtype, device=device) if residual else None
        placeholder = part
        _adaln_bwd_kernel[(B, chunks)](
            ln_input if ln else placeholder, dout if ln else placeholder, y if residual else placeholder,
            gate if residual else placeholder, dres if residual else placeholder,
            scale if ln else placeholder, weight if weight is not None else placeholder,
            dx if ln else placeholder, dy if residual else placeholder, part,
            B, T, D, rows_per_program, *_strides3(ln_input), *_strides3(dout), *_strides3(y), *_strides3(dres),
            gate.stride(0) if residual else 0, scale.stride(0) if ln else 0, eps,
            RESIDUAL=residual, LN=ln, HAS_W=weight is not None, BLOCK_A=block_a, BLOCK_T=block_t,
            NUM_STAGES=_pipeline_stages(x_dtype), num_warps=cfg["num_warps"],
        )

        dgate = torch.empty(B, D, dtype=gate.dtype, device=device) if residual else None
        dshift = torch.empty(B, D, dtype=shift_dtype, device=device) if ln else None
        dscale = torch.empty(B, D, dtype=scale.dtype, device=device) if ln else None
        fin_block_d = tu.col_block(D)
        fin_block_b = _finalize_block_b(B, tu.cdiv(D, fin_block_d), tu.sm_count(device))
        b_blocks = tu.cdiv(B, fin_block_b)
        dw_part = torch.empty(b_blocks, D, dtype=torch.float32, device=device) if weight is not None else None
        db_part = torch.empty(b_blocks, D, dtype=torch.float32, device=device) if bias is not None else None
        _adaln_finalize_kernel[(b_blocks, tu.cdiv(D, fin_block_d))](
            part, scale if ln else placeholder, weight if weight is not None else placeholder,
            bias if bias is not None else placeholder, dshift if ln else placeholder, dscale if ln else placeholder,
            dgate if residual else placeholder, dw_part if dw_part is not None else placeholder,
            db_part if db_part is not None else placeholder,
            B, D, chunks, scale.stride(0) if ln else 0,
            RESIDUAL=residual, LN=ln, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_B=fin_block_b, BLOCK_D=fin_block_d,
        )
        dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else None
        dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return None, None, dx, dgate, dy, dshift, dscale, dweight, dbias, None


def ln_modulate_triton(x, shift, scale, weight=None, bias=None, eps=1e-6):
    """Triton version of `ln_modulate_reference` (same contract)."""
    _check_adaln("ln_modulate", x, None, {"shift": shift, "scale": scale}, weight, bias)
    return _AdaLN.apply(False, True, x, None, None, shift, scale, weight, bias, eps)


def gate_residual_triton(x, gate, y):
    """Triton version of `gate_residual_reference` (same contract)."""
    _check_adaln("gate_residual", x, y, {"gate": gate}, None, None)
    return _AdaLN.apply(True, False, x, gate, y, None, None, None, None, 0.0)


def gate_residual_ln_modulate_triton(x, gate, y, shift, scale, weight=None, bias=None, eps=1e-6):
    """Triton version of `gate_residual_ln_modulate_reference` (same contract): returns (x1, modulated LN(x1))."""
    _check_adaln("gate_residual_ln_modulate", x, y, {"gate": gate, "shift": shift, "scale": scale}, weight, bias)
    return _AdaLN.apply(True, True, x, gate, y, shift, scale, weight, bias, eps)
