import math

import numpy as np
import pytest
import torch

from usp_fast.models.layers import sincos_pos_embed_2d
from usp_fast.models.usp_vit import build_model, encoder_param_count
from usp_fast.optim import decay_groups


def test_masking_invariants():
    model = build_model("usp_vit_test", input_size=28)  # 14x14 = 196 patches, as ViT at 224 px
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = model.random_masking(5, "cpu", g)
    L = 196
    assert ids_keep.shape == (5, 49) and ids_restore.shape == (5, L)
    assert (mask.sum(1) == L - 49).all()
    for b in range(5):
        assert sorted(ids_restore[b].tolist()) == list(range(L))  # a permutation
        assert len(set(ids_keep[b].tolist())) == 49
        # ids_restore inverts the shuffle: kept patches sit at shuffled positions < K and are unmasked
        assert (ids_restore[b, ids_keep[b]] == torch.arange(49)).all()
        assert (mask[b, ids_keep[b]] == 0).all()
    # different rows draw different masks; the same generator seed repeats them
    assert not torch.equal(ids_keep[0], ids_keep[1])
    again = model.random_masking(5, "cpu", torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, ids_keep)


def _norm_pix_loss_numpy(pred, target, mask, p, eps=1e-6):
    """Independent loop implementation of MAE's norm_pix_loss on latents (float64)."""
    B, C, H, W = target.shape
    total, count = 0.0, 0.0
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                l = i * (W // p) + j
                patch = target[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].transpose(1, 2, 0).reshape(-1)
                t = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + eps)
                total += mask[b, l] * np.mean((pred[b, l] - t) ** 2)
                count += mask[b, l]
    return total / count


def test_norm_pix_loss_matches_independent_computation():
    torch.manual_seed(0)
    model = build_model("usp_vit_test", input_size=8)
    latents = torch.randn(3, 4, 8, 8) * 2 + 0.5
    loss, pred, mask = model(latents, generator=torch.Generator().manual_seed(3))
    want = _norm_pix_loss_numpy(pred.detach().double().numpy(), latents.double().numpy(), mask.numpy(), 2)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # only masked patches are scored: changing a visible patch's prediction cannot change the loss
    loss.backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    import usp_fast_kernels as kernels
    pred, target = torch.randn(2, 16, 16, requires_grad=True), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 16)
    mask[:, :12] = 1
    kernels.patch_norm_mse(pred, target, mask, 2).backward()
    assert (pred.grad[:, 12:] == 0).all() and (pred.grad[:, :12] != 0).any()


@pytest.mark.parametrize("name,width,depth,params", [
    ("usp_vit_b", 768, 12, 85_069_824), ("usp_vit_l", 1024, 24, 302_329_856), ("usp_vit_xl", 1152, 28, 446_349_312)])
def test_encoder_parameter_counts(name, width, depth, params):
    with torch.device("meta"):
        model = build_model(name)
    assert (model.cfg.embed_dim, model.cfg.depth) == (width, depth)
    got = sum(p.numel() for k, p in model.named_parameters() if k.startswith(model.ENCODER_PREFIXES))
    assert got == encoder_param_count(width, depth) == params
    # decoder: 8 blocks x 512 as in the paper
    assert model.cfg.decoder_depth == 8 and model.cfg.decoder_dim == 512


def test_sincos_pos_embed_is_fixed_and_distinct():
    emb = sincos_pos_embed_2d(64, 14, num_prefix=1)
    assert emb.shape == (197, 64) and (emb[0] == 0).all()
    assert torch.allclose(emb[1:].norm(dim=1), torch.full((196,), math.sqrt(32.0)), atol=1e-5)
    assert torch.cdist(emb[1:], emb[1:]).add(torch.eye(196)).min() > 0.1  # every position distinct
    model = build_model("usp_vit_test", input_size=8)
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()


def test_mae_initialisation_and_decay_groups():
    torch.manual_seed(0)
    model = build_model("usp_vit_test", input_size=8)
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.9)
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Linear))
    decay, no_decay = decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token"} <= decayed  # as the official MAE/USP optimizer (timm defaults)
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"} <= skipped
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_encoder_sees_only_visible_patches():
    """Changing a masked patch's latent cannot change the encoder output of the visible set."""
    torch.manual_seed(0)
    model = build_model("usp_vit_test", input_size=8).eval()
    ids_keep, ids_restore, mask = model.random_masking(1, "cpu", torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 8, 8)
    masked_patch = int(mask[0].nonzero()[0])
    y = x.clone()
    r, c = divmod(masked_patch, 4)
    y[..., 2 * r: 2 * r + 2, 2 * c: 2 * c + 2] += 5.0
    assert torch.equal(model.forward_encoder(x, ids_keep), model.forward_encoder(y, ids_keep))
