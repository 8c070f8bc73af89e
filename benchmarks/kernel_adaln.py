"""Kernels-suite cases of kernels/adaln.py: LayerNorm + modulate, gated residual, and the two fused, at DiT-XL/2's
256 px shape; on a GPU with liger-kernel installed, its Triton LayerNorm is timed beside them as a peer."""
import torch

from usp_fast_benchmarks import roofline
from usp_fast_benchmarks.kernel_case import KernelCase, dtype_name
from usp_fast_kernels import adaln

SHAPE, TINY = dict(B=256, T=256, D=1152), dict(B=2, T=8, D=64)  # DiT-XL/2 at 256 px; the CPU smoke shape


def cases(ctx, inp):
    """The adaLN ops at DiT-XL/2, 256px (no LayerNorm affine, as DiT)."""
    shape = TINY if ctx.tiny else SHAPE
    B, T, D = shape["B"], shape["T"], shape["D"]
    x, y = inp.randn(B, T, D, grad=True), inp.randn(B, T, D, grad=True)
    shift, scale, gate = (inp.randn(B, D, grad=True) for _ in range(3))

    def moved(op):  # the minimum bytes of the fused op, forward and backward (benchmarks/roofline.py)
        t = roofline.traffic(op, "fused", dtype_name(inp.dtype), **shape)
        return dict(bytes_fwd=t.bytes("fwd"), bytes_bwd=t.bytes("bwd"))
    ln = liger_layer_norm(ctx, D, x)
    peer = (lambda h: ln(h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)) if ln else None
    return [
        KernelCase("ln_modulate", shape, {
            "triton": lambda: adaln.ln_modulate_triton(x, shift, scale),
            "eager": lambda: adaln.ln_modulate_reference(x, shift, scale),
            **({"liger": lambda: peer(x)} if peer else {}),
        }, [x, shift, scale], **moved("ln_modulate")),
        KernelCase("gate_residual", shape, {
            "triton": lambda: adaln.gate_residual_triton(x, gate, y),
            "eager": lambda: adaln.gate_residual_reference(x, gate, y),
        }, [x, gate, y], **moved("gate_residual")),
        KernelCase("gate_residual_ln_modulate", shape, {
            "triton": lambda: adaln.gate_residual_ln_modulate_triton(x, gate, y, shift, scale),
            "eager": lambda: adaln.gate_residual_ln_modulate_reference(x, gate, y, shift, scale),
            **({"liger": lambda: (lambda x1: (x1, peer(x1)))(adaln.gate_residual_reference(x, gate, y))}
               if peer else {}),
        }, [x, gate, y, shift, scale], **moved("gate_residual_ln_modulate")),
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
