"""Which implementation of a fused op runs: `backend()` decides, from USP_FAST_KERNELS (see the package
docstring), and `call()` runs it. Imported by the package's public functions and by _compiled.py."""
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


def call(op, *args):
    """Run `op` on its arguments with the implementation backend() picks (from its first tensor)."""
    impl = _triton_impl(op) if backend(args[0], op) == "triton" else getattr(_MODULES[op], f"{op}_reference")
    return impl(*args)
