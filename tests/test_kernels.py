"""Triton kernels against their PyTorch references (computed in fp64), gradients included, plus the dispatch.

On a machine without CUDA the kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set
before triton is imported), in fp32 and fp16; bf16 is checked only on CUDA, where the interpreter is not used.
"""
import contextlib
import importlib
import os
import zlib

import torch

if not torch.cuda.is_available():  # must precede the first import of triton / kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402

# `kernels.patch_norm_mse` is the dispatching function; the modules are reached by their full names.
masked_tokens = importlib.import_module("kernels.masked_tokens")
patch_norm_mse = importlib.import_module("kernels.patch_norm_mse")
adaln = importlib.import_module("kernels.adaln")
triton_utils = importlib.import_module("kernels._triton_utils")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# max |kernel - fp64 reference| allowed, relative to max |reference|
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton needs CUDA or TRITON_INTERPRET=1 set before import")


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


def check_against_reference(triton_fn, reference_fn, inputs, dtype, gen, names):
    """Forward outputs and every input gradient of the Triton op (outputs poisoned) against fp64."""
    test_inputs = leaves(inputs, dtype)
    with poisoned_allocations():
        outs, grads, upstream = run_op(triton_fn, test_inputs, gen=gen)
    ref_inputs = leaves([t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs],
                        torch.float64)
    ref_outs, ref_grads, _ = run_op(reference_fn, ref_inputs, [u.to(dtype).double() for u in upstream])
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        scalar_loss = r.dim() == 0 and o.dtype == torch.float32  # losses are fp32 whatever the input dtype
        assert o.dtype == dtype or scalar_loss, f"output {i} dtype {o.dtype}"
        assert_close(o, r, dtype, f"output {i}")
    assert len(grads) == len(names) == len(ref_grads)
    for name, g, r in zip(names, grads, ref_grads):
        assert_close(g, r, dtype, f"d({name})")


def assert_deterministic(fn, inputs, gen):
    """Two backward passes with the same upstream gradient give bitwise-equal gradients."""
    first = leaves(inputs, inputs[0].dtype)
    _, grads1, upstream = run_op(fn, first, gen=gen)
    second = leaves(inputs, inputs[0].dtype)
    _, grads2, _ = run_op(fn, second, upstream)
    assert len(grads1) == len(grads2) > 0
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


# ---- masked tokens ----

MASKED_SHAPES = [(1, 196, 72), (3, 256, 200), (3, 196, 384)]  # (B, L, D); a quarter of L is kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,D", MASKED_SHAPES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_keep_gather_matches_reference(dtype, B, L, D, with_pos, gen):
    ids_keep = random_permutations(B, L, gen)[:, : L // 4]
    x = randn(B, L, D, gen=gen)
    pos = randn(L, D, gen=gen) if with_pos else None
    names = ["x", "pos"] if with_pos else ["x"]
    check_against_reference(masked_tokens.keep_gather_triton, masked_tokens.keep_gather_reference,
                            [x, ids_keep, pos], dtype, gen, names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,D", MASKED_SHAPES)
@pytest.mark.parametrize("num_prefix,with_pos", [(1, True), (0, False)])
def test_unshuffle_matches_reference(dtype, B, L, D, num_prefix, with_pos, gen):
    K = L // 4
    ids_restore = torch.argsort(random_permutations(B, L, gen), dim=1)
    y = randn(B, num_prefix + K, D, gen=gen)
    mask_token = randn(D, gen=gen)
    pos = randn(num_prefix + L, D, gen=gen) if with_pos else None
    names = ["y", "mask_token", "pos"] if with_pos else ["y", "mask_token"]
    check_against_reference(
        lambda *a: masked_tokens.unshuffle_triton(*a, num_prefix=num_prefix),
        lambda *a: masked_tokens.unshuffle_reference(*a, num_prefix=num_prefix),
        [y, mask_token, ids_restore, pos], dtype, gen, names)


def test_masked_ops_accept_int32_ids_and_strided_views(gen):
    B, L, D = 2, 196, 72
    ids = random_permutations(B, L, gen)
    x_t = randn(B, D, L, gen=gen).transpose(1, 2)  # PatchEmbed's layout: last dim not unit-stride
    ids_keep = ids[:, :49].to(torch.int32)
    out = masked_tokens.keep_gather_triton(x_t, ids_keep)
    assert torch.equal(out, masked_tokens.keep_gather_reference(x_t, ids_keep))
    y = randn(B, 2 + 49, D, gen=gen)[:, 1:]  # a view that skips a leading row
    ids_restore = torch.argsort(ids, dim=1).to(torch.int32)
    mask_token = randn(D, gen=gen)
    assert torch.equal(masked_tokens.unshuffle_triton(y, mask_token, ids_restore, num_prefix=1),
                       masked_tokens.unshuffle_reference(y, mask_token, ids_restore, num_prefix=1))


def test_masked_ops_backward_is_deterministic(gen):
    B, L, D, K = 3, 196, 200, 49
    ids = random_permutations(B, L, gen)
    x, pos = randn(B, L, D, gen=gen), randn(L, D, gen=gen)
    assert_deterministic(lambda x, pos: masked_tokens.keep_gather_triton(x, ids[:, :K], pos), [x, pos], gen)
    y, mask_token, dpos = randn(B, 1 + K, D, gen=gen), randn(D, gen=gen), randn(1 + L, D, gen=gen)
    ids_restore = torch.argsort(ids, dim=1)
    assert_deterministic(lambda y, m, p: masked_tokens.unshuffle_triton(y, m, ids_restore, p, num_prefix=1),
                         [y, mask_token, dpos], gen)


def test_masked_op_gradients_with_the_batch_split_over_programs(monkeypatch, gen):
    # one batch row per program: d(pos) and d(mask_token) are then sums of several partials
    monkeypatch.setattr(triton_utils, "target_programs", lambda device: 10**6)
    B, L, D, K = 3, 196, 72, 49
    ids = random_permutations(B, L, gen)
    check_against_reference(masked_tokens.keep_gather_triton, masked_tokens.keep_gather_reference,
                            [randn(B, L, D, gen=gen), ids[:, :K], randn(L, D, gen=gen)], torch.float32, gen,
                            ["x", "pos"])
    check_against_reference(
        lambda *a: masked_tokens.unshuffle_triton(*a, num_prefix=1),
        lambda *a: masked_tokens.unshuffle_reference(*a, num_prefix=1),
        [randn(B, 1 + K, D, gen=gen), randn(D, gen=gen), torch.argsort(ids, dim=1), randn(1 + L, D, gen=gen)],
        torch.float32, gen, ["y", "mask_token", "pos"])


def test_masked_ops_reject_bad_shapes(gen):
    x = randn(2, 16, 8, gen=gen)
    with pytest.raises(ValueError, match="ids_keep"):
        masked_tokens.keep_gather_triton(x, torch.zeros(3, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="pos"):
        masked_tokens.keep_gather_triton(x, random_permutations(2, 16, gen)[:, :4], randn(15, 8, gen=gen))
    with pytest.raises(ValueError, match="mask_token"):
        masked_tokens.unshuffle_triton(randn(2, 5, 8, gen=gen), randn(7, gen=gen), random_permutations(2, 16, gen),
                                       num_prefix=1)


# ---- norm-pix MSE ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,side,p", [(1, 4, 28, 2), (3, 4, 32, 2), (2, 16, 14, 1), (1, 3, 15, 3)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_norm_mse_matches_reference(dtype, B, C, side, p, norm_pix, gen):
    L, N = (side // p) ** 2, p * p * C
    pred = randn(B, L, N, gen=gen)
    target = randn(B, C, side, side, gen=gen) * 3 + 1
    mask = (torch.rand(B, L, generator=gen, device=DEVICE) < 0.75).float()
    mask[0, 0] = 1  # at least one scored patch

    target = target.to(dtype)

    def triton_fn(pred):
        return patch_norm_mse.patch_norm_mse_triton(pred, target, mask, p, norm_pix)

    def reference_fn(pred):
        return patch_norm_mse.patch_norm_mse_reference(pred, target.double(), mask, p, norm_pix)

    check_against_reference(triton_fn, reference_fn, [pred], dtype, gen, ["pred"])


def test_patch_norm_mse_reads_strided_inputs_and_bool_mask(gen):
    B, C, side, p = 2, 4, 16, 2
    L, N = (side // p) ** 2, p * p * C
    head = randn(B, 1 + L, N, gen=gen)
    pred = head[:, 1:]  # the decoder output minus its cls row, as the model passes it
    target = randn(B, C, side, side, gen=gen).to(memory_format=torch.channels_last)
    mask = torch.rand(B, L, generator=gen, device=DEVICE) < 0.75
    got = patch_norm_mse.patch_norm_mse_triton(pred, target, mask, p)
    want = patch_norm_mse.patch_norm_mse_reference(pred.double(), target.double(), mask, p)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_patch_norm_mse_backward_is_deterministic(gen):
    B, C, side, p = 3, 4, 28, 2
    target = randn(B, C, side, side, gen=gen)
    mask = (torch.rand(B, 196, generator=gen, device=DEVICE) < 0.75).float()
    assert_deterministic(lambda pred: patch_norm_mse.patch_norm_mse_triton(pred, target, mask, p),
                         [randn(B, 196, 16, gen=gen)], gen)


def test_patch_norm_mse_rejects_mismatched_shapes(gen):
    with pytest.raises(ValueError, match="pred must be"):
        patch_norm_mse.patch_norm_mse_triton(randn(2, 16, 12, gen=gen), randn(2, 4, 8, 8, gen=gen),
                                             torch.ones(2, 16, device=DEVICE), 2)


# ---- adaLN: LayerNorm + modulate, gated residual ----

ADALN_SHAPES = [(3, 1, 72), (1, 37, 200), (3, 5, 384)]  # (B, T, D)


def adaln_inputs(B, T, D, affine, gen):
    x, y = randn(B, T, D, gen=gen), randn(B, T, D, gen=gen)
    # the model's shift/scale/gate are chunks of one modulation output: views with a row stride of 3 * D
    shift, scale, gate = randn(B, 3 * D, gen=gen).chunk(3, dim=1)
    weight = 1 + randn(D, gen=gen) * 0.1 if affine else None
    bias = randn(D, gen=gen) * 0.1 if affine else None
    return x, y, shift, scale, gate, weight, bias


def affine_names(affine):
    return ["weight", "bias"] if affine else []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D", ADALN_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_ln_modulate_matches_reference(dtype, B, T, D, affine, gen):
    x, _, shift, scale, _, weight, bias = adaln_inputs(B, T, D, affine, gen)
    check_against_reference(adaln.ln_modulate_triton, adaln.ln_modulate_reference,
                            [x, shift, scale, weight, bias], dtype, gen,
                            ["x", "shift", "scale"] + affine_names(affine))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D", ADALN_SHAPES)
def test_gate_residual_matches_reference(dtype, B, T, D, gen):
    x, y, _, _, gate, _, _ = adaln_inputs(B, T, D, False, gen)
    check_against_reference(adaln.gate_residual_triton, adaln.gate_residual_reference, [x, gate, y], dtype, gen,
                            ["x", "gate", "y"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D", ADALN_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_gate_residual_ln_modulate_matches_reference(dtype, B, T, D, affine, gen):
    x, y, shift, scale, gate, weight, bias = adaln_inputs(B, T, D, affine, gen)
    check_against_reference(adaln.gate_residual_ln_modulate_triton, adaln.gate_residual_ln_modulate_reference,
                            [x, gate, y, shift, scale, weight, bias], dtype, gen,
                            ["x", "gate", "y", "shift", "scale"] + affine_names(affine))


def test_adaln_weight_grads_summed_over_batch_blocks(gen):
    # more batch rows than one finalize block: d(weight), d(bias) add per-block partials
    B = 2 * adaln._FINALIZE_BLOCK_B + 1
    x, y, shift, scale, gate, weight, bias = adaln_inputs(B, 2, 72, True, gen)
    check_against_reference(adaln.gate_residual_ln_modulate_triton, adaln.gate_residual_ln_modulate_reference,
                            [x, gate, y, shift, scale, weight, bias], torch.float32, gen,
                            ["x", "gate", "y", "shift", "scale", "weight", "bias"])


def test_adaln_backward_is_deterministic_across_chunks(gen):
    # B=1 with many tokens: each batch row is split over several programs whose partials are then reduced
    x, y, shift, scale, gate, weight, bias = adaln_inputs(1, 256, 200, True, gen)
    assert adaln._row_chunks(1, 256, 200, 8)[3] > 1
    assert_deterministic(adaln.gate_residual_ln_modulate_triton, [x, gate, y, shift, scale, weight, bias], gen)
    assert_deterministic(adaln.ln_modulate_triton, [x, shift, scale, weight, bias], gen)


def test_adaln_rejects_bad_shapes(gen):
    x = randn(2, 3, 8, gen=gen)
    with pytest.raises(ValueError, match="shift"):
        adaln.ln_modulate_triton(x, randn(2, 7, gen=gen), randn(2, 8, gen=gen))
    with pytest.raises(ValueError, match="y must match"):
        adaln.gate_residual_triton(x, randn(2, 8, gen=gen), randn(2, 4, 8, gen=gen))


# ---- dispatch ----

OPS = ["keep_gather", "unshuffle", "patch_norm_mse", "ln_modulate", "gate_residual", "gate_residual_ln_modulate"]


@pytest.mark.parametrize("choice,expected", [("triton", "triton"), ("reference", "reference"),
                                             ("auto", "cuda-dependent"), ("", "cuda-dependent")])
def test_backend_follows_env(monkeypatch, choice, expected):
    monkeypatch.setenv(kernels.ENV_VAR, choice)
    cpu, on_device = torch.zeros(1), torch.zeros(1, device=DEVICE)
    for op in OPS:
        if expected == "cuda-dependent":  # auto: Triton for CUDA tensors only
            assert kernels.backend(cpu, op) == "reference"
            assert kernels.backend(on_device, op) == ("triton" if CUDA else "reference")
        else:
            assert kernels.backend(on_device, op) == expected


def test_backend_rejects_unknown_choice(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.backend(torch.zeros(1), "keep_gather")


@pytest.mark.parametrize("choice", ["triton", "reference"])
def test_public_ops_call_the_chosen_implementation(monkeypatch, choice):
    monkeypatch.setenv(kernels.ENV_VAR, choice)
    modules = {"keep_gather": masked_tokens, "unshuffle": masked_tokens, "patch_norm_mse": patch_norm_mse,
               "ln_modulate": adaln, "gate_residual": adaln, "gate_residual_ln_modulate": adaln}
    for op, module in modules.items():
        monkeypatch.setattr(module, f"{op}_{choice}", lambda *a, op=op, **k: f"{op}:{choice}")
    t = torch.zeros(2, 4, 8, device=DEVICE)
    assert kernels.keep_gather(t, None) == f"keep_gather:{choice}"
    assert kernels.unshuffle(t, None, None) == f"unshuffle:{choice}"
    assert kernels.patch_norm_mse(t, None, None, 2) == f"patch_norm_mse:{choice}"
    assert kernels.ln_modulate(t, None, None) == f"ln_modulate:{choice}"
    assert kernels.gate_residual(t, None, None) == f"gate_residual:{choice}"
    assert kernels.gate_residual_ln_modulate(t, None, None, None, None) == f"gate_residual_ln_modulate:{choice}"


# ---- the model through either backend ----

def model_loss_and_grads(monkeypatch, choice, latents, seed):
    from usp_fast.models.usp_vit import build_model

    monkeypatch.setenv(kernels.ENV_VAR, choice)
    torch.manual_seed(0)
    model = build_model("usp_vit_test", input_size=latents.shape[-1]).to(DEVICE)
    g = torch.Generator(device=DEVICE)
    g.manual_seed(seed)
    loss, pred, mask = model(latents, generator=g)
    loss.backward()
    return loss.detach(), mask, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("side", [8, 28])  # 16 and 196 patches
def test_usp_vit_same_loss_and_grads_with_either_backend(monkeypatch, gen, side):
    latents = randn(2, 4, side, side, gen=gen)
    ref_loss, ref_mask, ref_grads = model_loss_and_grads(monkeypatch, "reference", latents, seed=123)
    loss, mask, grads = model_loss_and_grads(monkeypatch, "triton", latents, seed=123)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and ref_grads[name] is not None, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
