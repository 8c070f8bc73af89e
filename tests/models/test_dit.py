"""DiT/SiT backbone: registry, the fused adaLN-Zero forward against the plain formula, zero-init, label dropout."""
import math

import pytest
import torch
import torch.nn.functional as F

import usp_fast_kernels as kernels
from usp_fast.models.dit import MODELS, build_model, drop_labels, model_config


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_paper_sizes():
    for family in ("DiT", "SiT"):
        for size, (width, depth, heads) in {"XL": (1152, 28, 16), "L": (1024, 24, 16), "B": (768, 12, 12),
                                           "S": (384, 12, 6)}.items():
            for p in (2, 4, 8):
                cfg = model_config(f"{family}-{size}/{p}")
                assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (width, depth, heads, p)
    assert model_config("DiT-XL/2").learn_sigma and model_config("DiT-XL/2").out_channels == 8
    assert not model_config("SiT-XL/2").learn_sigma and model_config("SiT-XL/2").out_channels == 4
    # DiT-XL/2 has 675,129,632 parameters counting its frozen pos-emb (a buffer here: 256 x 1152)
    with torch.device("meta"):
        xl = build_model("DiT-XL/2")
    assert sum(p.numel() for p in xl.parameters()) + xl.pos_embed.numel() == 675_129_632
    with pytest.raises(KeyError, match="unknown model"):
        model_config("DiT-XXL/2")
    assert "DiT-Tiny/2" in MODELS and "SiT-Test/2" in MODELS


def test_timestep_embedding_closed_form():
    m = build_model("DiT-Test/2", input_size=8, num_classes=4)
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = m.t_embedder.frequencies(t)
    k = 5
    freq = math.exp(-math.log(10000) * k / 128)
    torch.testing.assert_close(emb[:, k], torch.cos(t * freq))
    torch.testing.assert_close(emb[:, 128 + k], torch.sin(t * freq))


def _plain_forward(m, x, t, y):
    """DiT's forward written out without fusion: LN -> modulate -> branch -> gated residual, per branch."""
    cfg = m.cfg
    p = cfg.patch_size

    def ln_mod(norm, v, shift, scale):
        return F.layer_norm(v, (v.shape[-1],), norm.weight, norm.bias, norm.eps) * (1 + scale[:, None]) + shift[:, None]

    tok = m.x_embedder.proj(x).flatten(2).transpose(1, 2) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder.embedding_table(y)
    for b in m.blocks:
        s1, sc1, g1, s2, sc2, g2 = b.adaLN_modulation(c).chunk(6, dim=1)
        tok = tok + g1[:, None] * b.attn(ln_mod(b.norm1, tok, s1, sc1))
        tok = tok + g2[:, None] * b.mlp(ln_mod(b.norm2, tok, s2, sc2))
    shift, scale = m.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    out = m.final_layer.linear(ln_mod(m.final_layer.norm_final, tok, shift, scale))
    B, g, C = x.shape[0], cfg.grid_size, cfg.out_channels
    out = out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(B, C, g * p, g * p)


@pytest.mark.parametrize("overrides", [dict(), dict(norm_affine=True, mlp_act="gelu")])
def test_fused_forward_matches_plain_formula(overrides):
    torch.manual_seed(0)
    m = build_model("DiT-Test/2", input_size=8, num_classes=4, **overrides)
    with torch.no_grad():  # leave the zero init: every modulation, gate and the output layer become non-trivial
        for prm in m.parameters():
            prm.normal_(0, 0.2)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 4])
    out = m(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, _plain_forward(m, x, t, y), rtol=1e-5, atol=1e-5)


def test_blocks_go_through_the_kernels_dispatch(monkeypatch):
    calls = {"ln_modulate": 0, "gate_residual_ln_modulate": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*a, _name=name, _orig=original, **kw):
            calls[_name] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(kernels, name, counted)
    m = build_model("DiT-Test/2", input_size=8, num_classes=4)
    m(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert calls == {"ln_modulate": 1, "gate_residual_ln_modulate": 2 * m.cfg.depth}


def test_zero_init_blocks_are_identity_and_output_is_zero():
    torch.manual_seed(1)
    m = build_model("DiT-Test/2", input_size=8, num_classes=4)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    assert torch.equal(m(x, t, y), torch.zeros(2, 8, 8, 8))
    tok = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y)
    mod = m.blocks[0].modulation(c)
    h = kernels.ln_modulate(tok, mod[0], mod[1])
    out, _ = m.blocks[0](tok, h, mod, m.blocks[1].norm1, *m.blocks[1].modulation(c)[:2])
    assert torch.equal(out, tok)


def test_label_dropout_uses_the_generator_and_the_null_class():
    labels = torch.arange(10).repeat(100)
    a = drop_labels(labels, 0.1, 1000, torch.Generator().manual_seed(0))
    b = drop_labels(labels, 0.1, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    dropped = a == 1000
    assert 0.05 < dropped.float().mean() < 0.15 and torch.equal(a[~dropped], labels[~dropped])
    assert torch.equal(drop_labels(labels, 0.0, 1000), labels)
    m = build_model("DiT-Test/2", input_size=8, num_classes=4)
    assert m.y_embedder.embedding_table.num_embeddings == 5 and m.cfg.null_class == 4
    assert build_model("DiT-Test/2", input_size=8, num_classes=4, class_dropout_prob=0.0).cfg.null_class is None
