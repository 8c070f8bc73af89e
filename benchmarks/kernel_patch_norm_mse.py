"""Kernels-suite case of kernels/patch_norm_mse.py: the norm-pix MSE on the pretraining decoder's prediction."""
import importlib

import torch

from usp_fast_benchmarks import roofline
from usp_fast_benchmarks.kernel_case import KernelCase, dtype_name

# by its full name: the package attribute `usp_fast_kernels.patch_norm_mse` is the dispatching function
mse = importlib.import_module("usp_fast_kernels.patch_norm_mse")


# 28x28x4 latents in 2x2 patches (pretraining at 224 px); the mask is fp32, as the model makes it
SHAPE, TINY = dict(B=256, C=4, H=28, W=28, p=2, mask_dtype="float32"), dict(B=2, C=4, H=8, W=8, p=2,
                                                                            mask_dtype="float32")


def cases(ctx, inp):
    """Norm-pix MSE on the pretrain decoder's prediction: 28x28x4 latents in 2x2 patches."""
    shape = TINY if ctx.tiny else SHAPE
    B, C, side, p = shape["B"], shape["C"], shape["H"], shape["p"]
    L = (side // p) ** 2
    pred, target = inp.randn(B, L, p * p * C, grad=True), inp.randn(B, C, side, side)
    mask = (torch.rand(B, L, generator=inp.gen, device=inp.device) < 0.75).float()
    t = roofline.traffic("patch_norm_mse", "fused", dtype_name(inp.dtype), **shape)
    return [KernelCase("patch_norm_mse", shape, {
        "triton": lambda: mse.patch_norm_mse_triton(pred, target, mask, p),
        "eager": lambda: mse.patch_norm_mse_reference(pred, target, mask, p),
    }, [pred], bytes_fwd=t.bytes("fwd"), bytes_bwd=t.bytes("bwd"))]
