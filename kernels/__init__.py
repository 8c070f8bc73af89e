"""The one dispatch layer for fused ops. Models call only the functions defined here.

Which implementation runs is decided in `backend()` alone, from the environment variable USP_FAST_KERNELS:
  auto (default)  Triton for CUDA tensors when triton is installed and the op has a kernel, else the PyTorch reference
  triton          Triton always (CPU tensors only under TRITON_INTERPRET=1, which the tests use)
  reference       the PyTorch reference always
Each op's module holds its reference (`*_reference`) and, where written, its Triton path (`*_triton`, an
autograd.Function whose `@triton.jit` kernels sit in the matching `_<op>_jit.py`).

triton is optional: nothing here imports it, so this package imports and runs the references without it
(`auto` then picks the reference; `triton` raises). It is imported at the first launch of a Triton kernel.
Installed as `usp_fast_kernels` (setup.py maps the folder kernels/ to that name).
"""
import importlib.util
import os

from . import adaln, masked_tokens, patch_norm_mse

ENV_VAR = "USP_FAST_KERNELS"
_CHOICES = ("auto", "triton", "reference")
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looks triton up without importing it


def backend(tensor, op):
    """'triton' or 'reference' for `op` applied to `tensor`."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(_CHOICES)}")
    has_kernel = _HAS_TRITON and _triton_impl(op) is not None
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not has_kernel:
            raise RuntimeError(f"{ENV_VAR}=triton but op {op!r} has no Triton kernel here (is triton installed?)")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{ENV_VAR}=triton on a CPU tensor needs TRITON_INTERPRET=1")
        return "triton"
    return "triton" if (tensor.is_cuda and has_kernel) else "reference"


_MODULES = {
    "keep_gather": masked_tokens,
    "unshuffle": masked_tokens,
    "patch_norm_mse": patch_norm_mse,
    "ln_modulate": adaln,
    "gate_residual": adaln,
    "gate_residual_ln_modulate": adaln,
}


def _triton_impl(op):
    return getattr(_MODULES[op], f"{op}_triton", None)


def _call(op, tensor, *args, **kwargs):
    impl = _triton_impl(op) if backend(tensor, op) == "triton" else getattr(_MODULES[op], f"{op}_reference")
    return impl(*args, **kwargs)


def keep_gather(x, ids_keep, pos=None):
    """[B, L, D] -> visible tokens [B, K, D], pos-emb [L, D] added in the same pass."""
    return _call("keep_gather", x, x, ids_keep, pos)


def unshuffle(y, mask_token, ids_restore, pos=None, num_prefix=0):
    """[B, P+K, D] -> [B, P+L, D] with mask tokens in masked places, pos-emb [P+L, D] added."""
    return _call("unshuffle", y, y, mask_token, ids_restore, pos, num_prefix)


def patch_norm_mse(pred, target, mask, patch_size, norm_pix=True, eps=1e-6):
    """MAE norm-pix MSE over masked patches -> fp32 scalar. See patch_norm_mse.py."""
    return _call("patch_norm_mse", pred, pred, target, mask, patch_size, norm_pix, eps)


def ln_modulate(x, shift, scale, weight=None, bias=None, eps=1e-6):
    return _call("ln_modulate", x, x, shift, scale, weight, bias, eps)


def gate_residual(x, gate, y):
    return _call("gate_residual", x, x, gate, y)


def gate_residual_ln_modulate(x, gate, y, shift, scale, weight=None, bias=None, eps=1e-6):
    return _call("gate_residual_ln_modulate", x, x, gate, y, shift, scale, weight, bias, eps)


__all__ = [
    "backend", "keep_gather", "unshuffle", "patch_norm_mse", "ln_modulate", "gate_residual",
    "gate_residual_ln_modulate", "ENV_VAR",
]
