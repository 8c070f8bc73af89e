"""Shared by tests/kernels/: inputs, the fp64-reference comparison, the determinism check, the `gen` fixture.

On a machine without CUDA the kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set
before triton is imported), in fp32 and fp16; bf16 is checked only on CUDA, where the interpreter is not used.
A test module takes the `gen` fixture with `from kernel_checks import gen  # noqa: F401`.
"""
import contextlib
import importlib
import importlib.util
import os
import zlib

import torch

if not torch.cuda.is_available():  # must precede the first import of triton (tests/conftest.py does it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import usp_fast_kernels as kernels  # noqa: E402,F401  (re-exported to the test modules)

# `kernels.patch_norm_mse` is the dispatching function; the modules are reached by their full names.
masked_tokens = importlib.import_module("usp_fast_kernels.masked_tokens")
patch_norm_mse = importlib.import_module("usp_fast_kernels.patch_norm_mse")
adaln = importlib.import_module("usp_fast_kernels.adaln")
triton_utils = importlib.import_module("usp_fast_kernels._triton_utils")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# max |kernel - fp64 reference| allowed, relative to max |reference|
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

HAS_TRITON = importlib.util.find_spec("triton") is not None
# for the tests that launch Triton kernels (each test module sets `pytestmark = needs_triton` or marks its tests)
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="Triton kernels need triton, and CUDA or TRITON_INTERPRET=1 set before triton is imported")


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible per test."""
    g = torch.Generator(device=DEVICE)
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)


def random_permutations(batch, length, gen):
    """As the model masks: argsort of uniform noise per row."""
    return torch.argsort(torch.rand(batch, length, generator=gen, device=DEVICE), dim=1)


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty / empty_like made meanwhile starts as NaN, so an element a kernel fails to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def leaves(tensors, dtype):
    """Fresh leaf copies in `dtype` (None stays None) that require grad when floating."""
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
        else:
            out.append(t.detach().to(dtype).requires_grad_())
    return out


def run_op(fn, inputs, upstream=None, gen=None):
    """fn(*inputs) -> (outputs tuple, grads of every float input). Upstream grads are random unless given."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if upstream is None:
        upstream = [torch.randn(o.shape, generator=gen, device=DEVICE) for o in outs]
    torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    grads = [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, grads, upstream


def assert_close(actual, expected, dtype, what):
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    err = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-6)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} in {dtype}"
    return err / scale


def check_against_reference(triton_fn, reference_fn, inputs, dtype, gen, names):
    """Forward outputs and every input gradient of the Triton op (outputs poisoned) against fp64.
    -> {output i / d(name): max error relative to the reference's max magnitude}."""
    test_inputs = leaves(inputs, dtype)
    with poisoned_allocations():
        outs, grads, upstream = run_op(triton_fn, test_inputs, gen=gen)
    ref_inputs = leaves([t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs],
                        torch.float64)
    ref_outs, ref_grads, _ = run_op(reference_fn, ref_inputs, [u.to(dtype).double() for u in upstream])
    errors = {}
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        scalar_loss = r.dim() == 0 and o.dtype == torch.float32  # losses are fp32 whatever the input dtype
        assert o.dtype == dtype or scalar_loss, f"output {i} dtype {o.dtype}"
        errors[f"output {i}"] = assert_close(o, r, dtype, f"output {i}")
    assert len(grads) == len(names) == len(ref_grads)
    for name, g, r in zip(names, grads, ref_grads):
        errors[f"d({name})"] = assert_close(g, r, dtype, f"d({name})")
    return errors


def assert_deterministic(fn, inputs, gen):
    """Two backward passes with the same upstream gradient give bitwise-equal gradients."""
    first = leaves(inputs, inputs[0].dtype)
    _, grads1, upstream = run_op(fn, first, gen=gen)
    second = leaves(inputs, inputs[0].dtype)
    _, grads2, _ = run_op(fn, second, upstream)
    assert len(grads1) == len(grads2) > 0
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)
