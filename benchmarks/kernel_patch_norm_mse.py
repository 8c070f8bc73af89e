"""Kernels-suite case of kernels/patch_norm_mse.py: the norm-pix MSE on the pretraining decoder's prediction."""
import importlib

import torch

from usp_fast_benchmarks.kernel_case import KernelCase, nbytes

# by its full name: the package attribute `usp_fast_kernels.patch_norm_mse` is the dispatching function
mse = importlib.import_module("usp_fast_kernels.patch_norm_mse")


def cases(ctx, inp):
    """Norm-pix MSE on the pretrain decoder's prediction: 28x28x4 latents in 2x2 patches."""
    B, C, side, p = (2, 4, 8, 2) if ctx.tiny else (256, 4, 28, 2)
    L = (side // p) ** 2
    pred, target = inp.randn(B, L, p * p * C, grad=True), inp.randn(B, C, side, side)
    mask = (torch.rand(B, L, generator=inp.gen, device=inp.device) < 0.75).float()
    return [KernelCase("patch_norm_mse", dict(B=B, C=C, H=side, W=side, patch=p), {
        "triton": lambda: mse.patch_norm_mse_triton(pred, target, mask, p),
        "eager": lambda: mse.patch_norm_mse_reference(pred, target, mask, p),
    }, [pred], bytes_fwd=nbytes(pred, target, mask), bytes_bwd=nbytes(pred, target, mask, pred))]
