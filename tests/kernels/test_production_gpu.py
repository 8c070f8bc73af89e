"""Every fused op at its production shapes on a GPU, compiled, bf16 and fp32, against fp64 references: outputs
poisoned beforehand, inputs in the strided layouts the models pass (the patch embedding's transposed output, the
decoder output minus its cls row, modulation chunks), every gradient, and a bitwise-repeatable backward.
Run: `USP_FAST_TEST_GPU=1 pytest -m gpu tests/kernels` (benchmarks/gpu_check.sh does, and sets
USP_FAST_CORRECTNESS_JSON to collect the errors into one JSON file). Skipped without CUDA."""
import json
import os

import pytest
import torch

from kernel_checks import (CUDA, DEVICE, adaln, assert_deterministic, check_against_reference, gen,  # noqa: F401
                           masked_tokens, patch_norm_mse, random_permutations, randn)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="production shapes need a GPU "
                                                                    "(USP_FAST_TEST_GPU=1 on a CUDA machine)")]

B, L, K, D, DEC = 256, 196, 49, 1152, 512  # pretrain ViT-XL: 14x14 tokens, 25% kept; its 512-wide decoder
BG, T = 256, 256  # DiT-XL/2 at 256 px: 16x16 tokens, width 1152
DTYPES = [torch.bfloat16, torch.float32]
ERRORS = {}


@pytest.fixture(scope="module", autouse=True)
def write_errors():
    yield
    path = os.environ.get("USP_FAST_CORRECTNESS_JSON")
    if path and ERRORS:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "errors": ERRORS}, f,
                      indent=1)


def _transposed(b, t, d, gen):
    """[b, t, d] with the patch embedding's layout (a [b, d, t] tensor transposed)."""
    return randn(b, d, t, gen=gen).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_token_ops(dtype, gen):
    x = _transposed(B, L, D, gen)
    ids = random_permutations(B, L, gen)
    pos = randn(L, D, gen=gen)
    name = f"keep_gather/{dtype}"
    ERRORS[name] = check_against_reference(masked_tokens.keep_gather_triton, masked_tokens.keep_gather_reference,
                                           [x, ids[:, :K], pos], dtype, gen, ["x", "pos"])
    y, token, dpos = randn(B, 1 + K, DEC, gen=gen), randn(DEC, gen=gen), randn(1 + L, DEC, gen=gen)
    restore = torch.argsort(ids, 1)
    ERRORS[f"unshuffle/{dtype}"] = check_against_reference(
        lambda y, t, p: masked_tokens.unshuffle_triton(y, t, restore, p, 1),
        lambda y, t, p: masked_tokens.unshuffle_reference(y, t, restore, p, 1),
        [y, token, dpos], dtype, gen, ["y", "mask_token", "pos"])
    assert_deterministic(lambda x, p: masked_tokens.keep_gather_triton(x, ids[:, :K], p), [x.to(dtype), pos], gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_norm_mse(dtype, gen):
    head = randn(B, 1 + L, 16, gen=gen)
    side = 2 * round(L ** 0.5)  # 28: the 14x14 grid of 2x2 patches
    target = randn(B, 4, side, side, gen=gen).to(dtype)
    mask = torch.rand(B, L, generator=gen, device=DEVICE) < 0.75

    def fused(head):
        return patch_norm_mse.patch_norm_mse_triton(head[:, 1:], target, mask, 2)

    def reference(head):
        return patch_norm_mse.patch_norm_mse_reference(head[:, 1:], target.double(), mask, 2)

    ERRORS[f"patch_norm_mse/{dtype}"] = check_against_reference(fused, reference, [head], dtype, gen, ["pred"])
    assert_deterministic(fused, [head.to(dtype)], gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
def test_adaln_ops(dtype, affine, gen):
    x, y = _transposed(BG, T, D, gen), randn(BG, T, D, gen=gen)
    shift, scale, gate = randn(BG, 3 * D, gen=gen).chunk(3, dim=1)  # chunks of one modulation output
    w = 1 + randn(D, gen=gen) * 0.1 if affine else None
    b = randn(D, gen=gen) * 0.1 if affine else None
    names = ["weight", "bias"] if affine else []
    tag = f"{'affine' if affine else 'plain'}/{dtype}"
    ERRORS[f"ln_modulate/{tag}"] = check_against_reference(
        adaln.ln_modulate_triton, adaln.ln_modulate_reference, [x, shift, scale, w, b], dtype, gen,
        ["x", "shift", "scale", *names])
    ERRORS[f"gate_residual_ln_modulate/{tag}"] = check_against_reference(
        adaln.gate_residual_ln_modulate_triton, adaln.gate_residual_ln_modulate_reference,
        [x, gate, y, shift, scale, w, b], dtype, gen, ["x", "gate", "y", "shift", "scale", *names])
    if not affine:
        ERRORS[f"gate_residual/{dtype}"] = check_against_reference(
            adaln.gate_residual_triton, adaln.gate_residual_reference, [x, gate, y], dtype, gen, ["x", "gate", "y"])
    assert_deterministic(adaln.gate_residual_ln_modulate_triton,
                         [t.to(dtype) if t is not None else None for t in (x, gate, y, shift, scale, w, b)], gen)
