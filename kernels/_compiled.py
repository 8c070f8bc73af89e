"""The fused ops as torch.library custom ops: what the model calls under torch.compile (train.compile).

Each op is one opaque node in the compiled graph: dynamo does not trace into the Triton launch code (no graph
break) and inductor compiles everything around it. The forward runs the eager dispatch (`backend()`: Triton on
CUDA, the reference elsewhere). The backward is one more custom op, `usp_fast::fused_vjp`, which reruns the op
under autograd and takes its vector-Jacobian product through the same implementation's backward (the Triton
autograd.Function's kernels on CUDA). That costs one extra forward of the op per training step, about a third of
its forward + backward bytes (the ops are memory-bound and a few per cent of a step), and buys one generic
registration instead of a hand-written backward schema per op. Without torch.compile nothing goes through here.
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import adaln, masked_tokens, patch_norm_mse
from .dispatch import call

# op -> (the reference, used for shapes under fake tensors; positions of the tensors that get gradients;
#        the types of the trailing non-tensor arguments, which travel to fused_vjp as floats)
SPEC = {
    "keep_gather": (masked_tokens.keep_gather_reference, (0, 2), ()),
    "unshuffle": (masked_tokens.unshuffle_reference, (0, 1, 3), (int,)),
    "patch_norm_mse": (patch_norm_mse.patch_norm_mse_reference, (0,), (int, bool, float)),
    "ln_modulate": (adaln.ln_modulate_reference, (0, 1, 2, 3, 4), (float,)),
    "gate_residual": (adaln.gate_residual_reference, (0, 1, 2), ()),
    "gate_residual_ln_modulate": (adaln.gate_residual_ln_modulate_reference, (0, 1, 2, 3, 4, 5, 6), (float,)),
}


def _split(op, args):
    n_scalars = len(SPEC[op][2])
    return list(args[: len(args) - n_scalars]), [float(v) for v in args[len(args) - n_scalars:]]


def _register(op, eager):
    """Fake (shape) function, autograd and the eager implementation of custom op `eager` (named `op`)."""
    reference, diff, _ = SPEC[op]
    eager.register_fake(reference)

    def setup_context(ctx, inputs, output):
        ctx.tensors, ctx.scalars = _split(op, inputs)

    def backward(ctx, *grads):
        wrt = [i for i in diff if ctx.tensors[i] is not None]
        got = torch.ops.usp_fast.fused_vjp(op, ctx.tensors, ctx.scalars, list(grads))
        out = [None] * (len(ctx.tensors) + len(ctx.scalars))
        for i, g in zip(wrt, got):
            out[i] = g
        return tuple(out)

    eager.register_autograd(backward, setup_context=setup_context)


def _autograd_inside_a_custom_op():
    """A custom op's kernel runs with the autograd dispatch keys excluded; this lifts that exclusion, so the
    kernel can run autograd itself (torch.func's transforms would refuse the kernels' autograd.Functions)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for k in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
              torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("usp_fast::fused_vjp", mutates_args=())
def fused_vjp(op: str, tensors: List[Optional[Tensor]], scalars: List[float],
              grads: List[Optional[Tensor]]) -> List[Tensor]:
    """Gradients of op(*tensors, *scalars) for the present tensors at SPEC[op]'s differentiable positions."""
    _, diff, kinds = SPEC[op]
    inputs = [t.detach().requires_grad_(i in diff and t.is_floating_point()) if t is not None else None
              for i, t in enumerate(tensors)]
    wrt = [inputs[i] for i in diff if inputs[i] is not None]
    with _autograd_inside_a_custom_op(), torch.enable_grad():
        out = call(op, *inputs, *(kind(v) for kind, v in zip(kinds, scalars)))
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    got = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, got)]
    # a custom op's outputs may not alias its inputs or each other (d(x) of a residual add is the incoming grad)
    taken = {t.untyped_storage().data_ptr() for t in (*tensors, *grads) if t is not None}
    fresh = []
    for g in got:
        ptr = g.untyped_storage().data_ptr()
        fresh.append(g.clone() if ptr in taken else g)
        taken.add(ptr)
    return fresh


@fused_vjp.register_fake
def _(op, tensors, scalars, grads):
    return [torch.empty_like(tensors[i]) for i in SPEC[op][1] if tensors[i] is not None]


@torch.library.custom_op("usp_fast::keep_gather", mutates_args=())
def keep_gather(x: Tensor, ids_keep: Tensor, pos: Optional[Tensor]) -> Tensor:
    return call("keep_gather", x, ids_keep, pos)


@torch.library.custom_op("usp_fast::unshuffle", mutates_args=())
def unshuffle(y: Tensor, mask_token: Tensor, ids_restore: Tensor, pos: Optional[Tensor], num_prefix: int) -> Tensor:
    return call("unshuffle", y, mask_token, ids_restore, pos, num_prefix)


@torch.library.custom_op("usp_fast::patch_norm_mse", mutates_args=())
def patch_norm_mse_op(pred: Tensor, target: Tensor, mask: Tensor, patch_size: int, norm_pix: bool,
                      eps: float) -> Tensor:
    return call("patch_norm_mse", pred, target, mask, patch_size, norm_pix, eps)


@torch.library.custom_op("usp_fast::ln_modulate", mutates_args=())
def ln_modulate(x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> Tensor:
    return call("ln_modulate", x, shift, scale, weight, bias, eps)


@torch.library.custom_op("usp_fast::gate_residual", mutates_args=())
def gate_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return call("gate_residual", x, gate, y)


@torch.library.custom_op("usp_fast::gate_residual_ln_modulate", mutates_args=())
def gate_residual_ln_modulate(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor,
                              weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    return call("gate_residual_ln_modulate", x, gate, y, shift, scale, weight, bias, eps)


OPS = {"keep_gather": keep_gather, "unshuffle": unshuffle, "patch_norm_mse": patch_norm_mse_op,
       "ln_modulate": ln_modulate, "gate_residual": gate_residual,
       "gate_residual_ln_modulate": gate_residual_ln_modulate}
for _name, _op in OPS.items():
    _register(_name, _op)
