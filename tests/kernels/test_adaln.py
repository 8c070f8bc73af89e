"""LayerNorm + AdaLN modulate and the gated residual: Triton kernels against their PyTorch references (fp64)."""
import pytest
import torch

from kernel_checks import (DTYPES, adaln, assert_deterministic, check_against_reference, gen,  # noqa: F401
                           needs_triton, randn, triton_utils)

pytestmark = needs_triton


ADALN_SHAPES = [(3, 1, 72), (1, 37, 200), (3, 5, 384), (2, 3, 64)]  # (B, T, D); 64: no tail columns


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


def test_adaln_finalize_grid_fills_the_sms_with_small_batch_blocks(gen, monkeypatch):
    # DiT-XL/2 on 132 SMs: at b32 batch blocks of 2 rows give 16 x 9 = 144 programs (16 rows: 18); b256 keeps 16
    assert adaln._finalize_block_b(32, 9, 132) == 2 and adaln._finalize_block_b(256, 9, 132) == 16
    assert adaln._finalize_block_b(1, 9, 132) == 1
    # the backward and finalize chunking launch one wave at most: 2 chunks of 128 rows per batch row, not 3
    assert adaln._row_chunks(256, 256, 4 * 132) == (128, 2) and adaln._row_chunks(32, 256, 4 * 132) == (16, 16)
    # numerics with one- and two-row batch blocks (a device with many SMs), every gradient
    monkeypatch.setattr(triton_utils, "sm_count", lambda device: 64)
    x, y, shift, scale, gate, weight, bias = adaln_inputs(5, 3, 72, True, gen)
    assert adaln._finalize_block_b(5, 2, 64) == 1
    check_against_reference(adaln.gate_residual_ln_modulate_triton, adaln.gate_residual_ln_modulate_reference,
                            [x, gate, y, shift, scale, weight, bias], torch.float32, gen,
                            ["x", "gate", "y", "shift", "scale", "weight", "bias"])


def test_adaln_backward_is_deterministic_across_chunks(gen):
    # B=1 with many tokens: each batch row is split over several programs whose partials are then reduced
    x, y, shift, scale, gate, weight, bias = adaln_inputs(1, 256, 200, True, gen)
    assert adaln._row_chunks(1, 256, 8)[1] > 1
    assert_deterministic(adaln.gate_residual_ln_modulate_triton, [x, gate, y, shift, scale, weight, bias], gen)
    assert_deterministic(adaln.ln_modulate_triton, [x, shift, scale, weight, bias], gen)


def test_adaln_rejects_bad_shapes(gen):
    x = randn(2, 3, 8, gen=gen)
    with pytest.raises(ValueError, match="shift"):
        adaln.ln_modulate_triton(x, randn(2, 7, gen=gen), randn(2, 8, gen=gen))
    with pytest.raises(ValueError, match="y must match"):
        adaln.gate_residual_triton(x, randn(2, 8, gen=gen), randn(2, 4, 8, gen=gen))


def test_rows_split_into_a_power_of_two_block_and_a_tail():
    split = triton_utils.split_row
    assert split(1152) == (1024, 128) and split(768) == (512, 256) and split(384) == (256, 128)
    assert split(1024) == (1024, 16) and split(200) == (128, 128) and split(72) == (64, 16)
    for D in range(1, 3000, 7):
        main, tail = split(D)
        assert main <= D <= main + tail and main & (main - 1) == 0 and tail & (tail - 1) == 0


def _transposed(B, T, D, gen):
    """A [B, T, D] view of a [B, D, T] leaf: the patch embedding's layout (conv output flattened, transposed)."""
    leaf = randn(B, D, T, gen=gen).requires_grad_()
    return leaf, leaf.transpose(1, 2)


@pytest.mark.parametrize("op", ["ln_modulate", "gate_residual", "gate_residual_ln_modulate"])
def test_adaln_reads_strided_inputs_and_gradients_in_place(op, gen, monkeypatch):
    """x and y as transposed views and transposed upstream gradients: the same values and gradients as the fp64
    reference on contiguous copies, and no `.contiguous()` copy of any [B, T, D] tensor on the way."""
    B, T, D = 2, 6, 72
    x_leaf, x = _transposed(B, T, D, gen)
    y_leaf, y = _transposed(B, T, D, gen)
    shift, scale, gate = (randn(B, D, gen=gen).requires_grad_() for _ in range(3))
    weight, bias = (1 + randn(D, gen=gen) * 0.1).requires_grad_(), (randn(D, gen=gen) * 0.1).requires_grad_()
    args = {"ln_modulate": lambda x, y: (x, shift, scale, weight, bias),
            "gate_residual": lambda x, y: (x, gate, y),
            "gate_residual_ln_modulate": lambda x, y: (x, gate, y, shift, scale, weight, bias)}[op]
    fn, ref = getattr(adaln, f"{op}_triton"), getattr(adaln, f"{op}_reference")

    contiguous = torch.Tensor.contiguous

    def no_activation_copies(t, *a, **k):
        assert t.numel() != B * T * D or t.is_contiguous(), "a [B, T, D] activation was copied"
        return contiguous(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "contiguous", no_activation_copies)
    outs = fn(*args(x, y))
    outs = outs if isinstance(outs, tuple) else (outs,)
    upstream = [randn(B, D, T, gen=gen).transpose(1, 2) for _ in outs]
    torch.autograd.backward(outs, upstream)
    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)

    leaves64 = [t.detach().double().requires_grad_() for t in (x_leaf, y_leaf, shift, scale, gate, weight, bias)]
    x64, y64 = leaves64[0].transpose(1, 2).contiguous(), leaves64[1].transpose(1, 2).contiguous()
    s64, c64, g64, w64, b64 = leaves64[2:]
    args64 = {"ln_modulate": (x64, s64, c64, w64, b64), "gate_residual": (x64, g64, y64),
              "gate_residual_ln_modulate": (x64, g64, y64, s64, c64, w64, b64)}[op]
    ref_outs = ref(*args64)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    torch.autograd.backward(ref_outs, [u.double() for u in upstream])
    for o, r in zip(outs, ref_outs):
        assert o.is_contiguous()
        torch.testing.assert_close(o.double(), r, rtol=0, atol=1e-5)
    used = {"ln_modulate": (0, 2, 3, 5, 6), "gate_residual": (0, 1, 4),
            "gate_residual_ln_modulate": (0, 1, 2, 3, 4, 5, 6)}[op]
    mine = (x_leaf, y_leaf, shift, scale, gate, weight, bias)
    for i in used:
        torch.testing.assert_close(mine[i].grad.double(), leaves64[i].grad, rtol=0, atol=1e-4)


def test_launch_configs_come_from_the_committed_table_else_the_heuristic(monkeypatch):
    tu = triton_utils
    assert tu.launch_config("ln_modulate/bwd", 1152, torch.bfloat16, 1024) == {
        "num_warps": 4, "programs_per_sm": 4, "source": "heuristic"}
    assert tu.launch_config("ln_modulate/fwd", 2048, torch.float32, 2048)["num_warps"] == 8
    table = {("ln_modulate/bwd", 1152, "bf16"): {"num_warps": 2, "programs_per_sm": 16, "measured_on": "H200, x"}}
    monkeypatch.setattr(tu, "_launch_table", lambda: table)
    assert tu.launch_config("ln_modulate/bwd", 1152, torch.bfloat16, 1024) == {
        "num_warps": 2, "programs_per_sm": 16, "source": "H200, x"}
    assert tu.launch_config("ln_modulate/bwd", 1152, torch.float32, 1024)["source"] == "heuristic"
    import json
    committed = json.loads(tu.LAUNCH_TABLE_FILE.read_text())
    assert all({"op", "D", "dtype", "num_warps", "programs_per_sm", "measured_on"} <= set(e)
               for e in committed["entries"])  # only measured entries are committed
