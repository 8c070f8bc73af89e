"""keep_gather / unshuffle Triton kernels against their PyTorch references (fp64), gradients included."""
import pytest
import torch

from kernel_checks import (DEVICE, DTYPES, assert_deterministic, check_against_reference, gen,  # noqa: F401
                           masked_tokens, needs_triton, randn, random_permutations, triton_utils)

pytestmark = needs_triton


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


def test_masked_ops_read_strided_activations_and_gradients_without_copies(gen, monkeypatch):
    """The patch embedding's transposed output and a transposed upstream gradient are read in place: no
    `.contiguous()` of a full activation, and the gradients equal the reference's."""
    B, L, D, K = 2, 16, 72, 4
    ids = random_permutations(B, L, gen)
    leaf = randn(B, D, L, gen=gen).requires_grad_()
    contiguous = torch.Tensor.contiguous

    def no_activation_copies(t, *a, **k):
        assert t.dim() != 3 or t.is_contiguous(), f"a {tuple(t.shape)} activation was copied"
        return contiguous(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "contiguous", no_activation_copies)
    out = masked_tokens.keep_gather_triton(leaf.transpose(1, 2), ids[:, :K])
    upstream = randn(B, D, K, gen=gen).transpose(1, 2)
    out.backward(upstream)
    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    ref_leaf = leaf.detach().clone().requires_grad_()
    ref = masked_tokens.keep_gather_reference(ref_leaf.transpose(1, 2), ids[:, :K])
    ref.backward(upstream)
    assert torch.equal(out, ref) and torch.equal(leaf.grad, ref_leaf.grad)


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
