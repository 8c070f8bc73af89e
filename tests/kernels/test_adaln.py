"""LayerNorm + AdaLN modulate and the gated residual: Triton kernels against their PyTorch references (fp64)."""
import pytest
import torch

from kernel_checks import (DTYPES, adaln, assert_deterministic, check_against_reference, gen,  # noqa: F401
                           needs_triton, randn)

pytestmark = needs_triton


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
