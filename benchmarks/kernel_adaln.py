"""Kernels-suite cases of kernels/adaln.py: LayerNorm + modulate, gated residual, and the two fused, at DiT-XL/2's
256 px shape; on a GPU with liger-kernel installed, its Triton LayerNorm is timed beside them as a peer."""
import torch

from usp_fast_benchmarks.kernel_case import KernelCase, nbytes
from usp_fast_kernels import adaln


def cases(ctx, inp):
    """The adaLN ops at DiT-XL/2, 256px (no LayerNorm affine, as DiT)."""
    B, T, D = (2, 8, 64) if ctx.tiny else (256, 256, 1152)
    x, y = inp.randn(B, T, D, grad=True), inp.randn(B, T, D, grad=True)
    shift, scale, gate = (inp.randn(B, D, grad=True) for _ in range(3))
    act, vec = nbytes(inp.meta(B, T, D)), nbytes(inp.meta(B, D))
    shape = dict(B=B, T=T, D=D)
    ln = liger_layer_norm(ctx, D, x)
    peer = (lambda h: ln(h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)) if ln else None
    return [
        KernelCase("ln_modulate", shape, {
            "triton": lambda: adaln.ln_modulate_triton(x, shift, scale),
            "eager": lambda: adaln.ln_modulate_reference(x, shift, scale),
            **({"liger": lambda: peer(x)} if peer else {}),
        }, [x, shift, scale], bytes_fwd=2 * act + 2 * vec, bytes_bwd=3 * act + 3 * vec),
        KernelCase("gate_residual", shape, {  # backward: d(x) is d(out) itself
            "triton": lambda: adaln.gate_residual_triton(x, gate, y),
            "eager": lambda: adaln.gate_residual_reference(x, gate, y),
        }, [x, gate, y], bytes_fwd=3 * act + vec, bytes_bwd=3 * act + 2 * vec),
        KernelCase("gate_residual_ln_modulate", shape, {
            "triton": lambda: adaln.gate_residual_ln_modulate_triton(x, gate, y, shift, scale),
            "eager": lambda: adaln.gate_residual_ln_modulate_reference(x, gate, y, shift, scale),
            **({"liger": lambda: (lambda x1: (x1, peer(x1)))(adaln.gate_residual_reference(x, gate, y))}
               if peer else {}),
        }, [x, gate, y, shift, scale], bytes_fwd=4 * act + 3 * vec, bytes_bwd=6 * act + 5 * vec),
    ]


def liger_layer_norm(ctx, D, like):
    """liger-kernel's LayerNorm as h -> LN(h) (unit weight, zero bias: DiT's affine-free norm), or None when
    liger-kernel is not installed or this is not a GPU run. A peer, timed beside eager and compile."""
    if not ctx.on_gpu:
        return None
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        return None
    w, b = torch.ones(D, device=like.device, dtype=like.dtype), torch.zeros(D, device=like.device, dtype=like.dtype)
    return lambda h: LigerLayerNormFunction.apply(h, w, b, 1e-6)
