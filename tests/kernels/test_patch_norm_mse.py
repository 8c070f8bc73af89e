"""The norm-pix MSE Triton kernel against its PyTorch reference (fp64), gradient included."""
import pytest
import torch

from kernel_checks import (DEVICE, DTYPES, assert_deterministic, check_against_reference, gen,  # noqa: F401
                           needs_triton, patch_norm_mse, randn)


@needs_triton
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


@needs_triton
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


@needs_triton
def test_patch_norm_mse_backward_is_deterministic(gen):
    B, C, side, p = 3, 4, 28, 2
    target = randn(B, C, side, side, gen=gen)
    mask = (torch.rand(B, 196, generator=gen, device=DEVICE) < 0.75).float()
    assert_deterministic(lambda pred: patch_norm_mse.patch_norm_mse_triton(pred, target, mask, p),
                         [randn(B, 196, 16, gen=gen)], gen)


@needs_triton
def test_patch_norm_mse_rejects_mismatched_shapes(gen):
    with pytest.raises(ValueError, match="pred must be"):
        patch_norm_mse.patch_norm_mse_triton(randn(2, 16, 12, gen=gen), randn(2, 4, 8, 8, gen=gen),
                                             torch.ones(2, 16, device=DEVICE), 2)


def test_reference_patchify_is_the_models():
    # the package keeps its own reshape (it does not import usp_fast); it must stay the one the models use
    from usp_fast.models.layers import patchify, unpatchify

    x = torch.randn(2, 3, 12, 12)
    for p in (1, 2, 3):
        assert torch.equal(patch_norm_mse._patchify(x, p), patchify(x, p))
        assert torch.equal(unpatchify(patchify(x, p), p, 3), x)


@needs_triton
def test_patch_norm_mse_is_one_launch_each_way_and_repeatable(gen, monkeypatch):
    """Forward: one kernel (its last program reduces the partials and resets the device counter); backward: one
    kernel reading d(loss) and the masked count from device memory. Repeated calls give the same bits."""
    from usp_fast_kernels._patch_norm_mse_jit import _patch_norm_mse_kernel

    kind = type(_patch_norm_mse_kernel)  # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
    launches = []
    getitem = kind.__getitem__
    monkeypatch.setattr(kind, "__getitem__", lambda self, grid: launches.append(self.fn.__name__) or getitem(self, grid))
    B, C, side, p = 3, 4, 28, 2
    target = randn(B, C, side, side, gen=gen)
    mask = torch.rand(B, 196, generator=gen, device=DEVICE) < 0.75
    pred = randn(B, 196, 16, gen=gen).requires_grad_()
    loss = patch_norm_mse.patch_norm_mse_triton(pred, target, mask, p)
    assert launches == ["_patch_norm_mse_kernel"]
    (loss * 3).backward()
    assert launches == ["_patch_norm_mse_kernel"] * 2
    again = patch_norm_mse.patch_norm_mse_triton(pred.detach(), target, mask, p)
    assert torch.equal(again, loss.detach()) and int(patch_norm_mse._counter(pred.device).item()) == 0
    want = patch_norm_mse.patch_norm_mse_reference(pred.detach().double().requires_grad_(), target.double(), mask, p)
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
