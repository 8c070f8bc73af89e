"""The one dispatch layer for fused ops. Models call only the functions defined here.

Which implementation runs is decided in `backend()` alone (dispatch.py), from the environment variable USP_FAST_KERNELS:
  auto (default)  Triton for CUDA tensors when triton is installed and the op has a kernel, else the PyTorch reference
  triton          Triton always (CPU tensors only under TRITON_INTERPRET=1, which the tests use)
  reference       the PyTorch reference always
Each op's module holds its reference (`*_reference`) and, where written, its Triton path (`*_triton`, an
autograd.Function whose `@triton.jit` kernels sit in the matching `_<op>_jit.py`). Under torch.compile the
Triton paths are torch.library custom ops (_compiled.py), so they do not break the graph.

triton is optional: nothing here imports it, so this package imports and runs the references without it
(`auto` then picks the reference; `triton` raises). It is imported at the first launch of a Triton kernel.
Installed as `usp_fast_kernels` (setup.py maps the folder kernels/ to that name).
"""
import torch

from . import _compiled
from .dispatch import ENV_VAR, backend, call


def _dispatch(op, *args):
    """The implementation backend() picks. Under torch.compile a Triton op is its custom op (_compiled.py), one
    opaque graph node, while a reference is traced, so that inductor fuses it as it would the model's own code."""
    if torch.compiler.is_compiling() and backend(args[0], op) == "triton":
        return _compiled.OPS[op](*args)
    return call(op, *args)


def keep_gather(x, ids_keep, pos=None):
    """[B, L, D] -> visible tokens [B, K, D], pos-emb [L, D] added in the same pass."""
    return _dispatch("keep_gather", x, ids_keep, pos)


def unshuffle(y, mask_token, ids_restore, pos=None, num_prefix=0):
    """[B, P+K, D] -> [B, P+L, D] with mask tokens in masked places, pos-emb [P+L, D] added."""
    return _dispatch("unshuffle", y, mask_token, ids_restore, pos, num_prefix)


def patch_norm_mse(pred, target, mask, patch_size, norm_pix=True, eps=1e-6):
    """MAE norm-pix MSE over masked patches -> fp32 scalar. See patch_norm_mse.py."""
    return _dispatch("patch_norm_mse", pred, target, mask, patch_size, norm_pix, eps)


def ln_modulate(x, shift, scale, weight=None, bias=None, eps=1e-6):
    return _dispatch("ln_modulate", x, shift, scale, weight, bias, eps)


def gate_residual(x, gate, y):
    return _dispatch("gate_residual", x, gate, y)


def gate_residual_ln_modulate(x, gate, y, shift, scale, weight=None, bias=None, eps=1e-6):
    return _dispatch("gate_residual_ln_modulate", x, gate, y, shift, scale, weight, bias, eps)


__all__ = [
    "backend", "keep_gather", "unshuffle", "patch_norm_mse", "ln_modulate", "gate_residual",
    "gate_residual_ln_modulate", "ENV_VAR",
]
