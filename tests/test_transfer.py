"""USP encoder export -> DiT/SiT and -> ViT classifier: exact copies, exact key sets, clear errors."""
import pytest
import torch

from usp_fast.artifacts import load_encoder, save_encoder
from usp_fast.models.dit import build_model
from usp_fast.models.usp_vit import build_model as build_vit
from usp_fast.transfer import BLOCK_PARAMS, TransferError, resize_pos_embed, transfer_to_classifier, transfer_to_dit


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """usp_vit_test on a 28x28 latent (14x14 grid, as 224 px), every tensor randomised so copies are detectable."""
    torch.manual_seed(0)
    vit = build_vit("usp_vit_test", input_size=28)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.5)
    d = save_encoder(vit, tmp_path_factory.mktemp("export"), "usp_vit_test", resolution=224)
    return load_encoder(d)


def _dit(**kw):
    torch.manual_seed(1)
    return build_model("DiT-Test/2", input_size=32, num_classes=10, norm_affine=True, mlp_act="gelu", **kw)


BLOCK_KEYS = {f"blocks.{i}.{p}" for i in range(2) for p in BLOCK_PARAMS}


def test_transfer_copies_exactly_and_reports_exact_key_sets(export):
    source, meta = export
    model = _dit()
    report = transfer_to_dit(model, source, meta)
    state = model.state_dict()
    assert report.copied == {"x_embedder.proj.weight": "patch_embed.proj.weight",
                             "x_embedder.proj.bias": "patch_embed.proj.bias", **{k: k for k in BLOCK_KEYS}}
    for dst, src in report.copied.items():
        assert torch.equal(state[dst], source[src]), dst
    assert set(report.resized) == {"pos_embed"}
    assert report.ignored == {"cls_token", "norm.weight", "norm.bias"}
    fresh = {k for k in state if k.startswith(("t_embedder.", "y_embedder.", "final_layer."))}
    fresh |= {k for k in state if ".adaLN_modulation." in k}
    assert report.initialized == fresh
    assert set(report.copied) | set(report.resized) | report.initialized == set(state)
    assert "blocks.{0..1}.attn.qkv.weight" in report.summary()


def test_restored_layernorm_affine_equals_the_vits(export):
    source, meta = export
    model = _dit()
    transfer_to_dit(model, source, meta)
    for i, block in enumerate(model.blocks):
        for norm in ("norm1", "norm2"):
            assert torch.equal(getattr(block, norm).weight, source[f"blocks.{i}.{norm}.weight"])
            assert torch.equal(getattr(block, norm).bias, source[f"blocks.{i}.{norm}.bias"])
            assert getattr(block, norm).weight.requires_grad  # trainable, as USP


def test_pos_embed_drops_cls_row_and_resizes_14_to_16(export):
    source, meta = export
    model = _dit()
    transfer_to_dit(model, source, meta)
    grid = source["pos_embed"][:, 1:]
    assert model.pos_embed.shape == (1, 256, 32)
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(grid, 16))
    # bicubic at equal size is the identity; on a constant grid it stays constant at any size
    assert torch.equal(resize_pos_embed(grid, 14), grid)
    const = torch.full((1, 196, 8), 0.3)
    torch.testing.assert_close(resize_pos_embed(const, 32), torch.full((1, 1024, 8), 0.3))


def test_freshly_transferred_dit_is_dit_zero_init(export):
    """adaLN-Zero: every transferred block is the identity, so the output is what DiT's zero init gives: zeros, and
    with any final layer exactly the final layer applied to the embedded input."""
    source, meta = export
    model = _dit()
    transfer_to_dit(model, source, meta)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), torch.tensor([3, 10])
    assert torch.equal(model(x, t, y), torch.zeros(2, 8, 32, 32))
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.3)
    blockless = _dit(depth=1)  # a 1-block DiT whose block is zero-init too, sharing every non-block tensor
    blockless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")} |
                              {k: v for k, v in blockless.state_dict().items() if k.startswith("blocks.")})
    assert torch.equal(model(x, t, y), blockless(x, t, y))
    assert not torch.equal(model(x, t, y), torch.zeros(2, 8, 32, 32))


def test_keep_first_blocks_reinitialises_the_rest(export):
    source, meta = export
    model = _dit()
    with torch.no_grad():
        model.blocks[1].norm1.weight.fill_(7.0)  # must be reset, not left as it was
    report = transfer_to_dit(model, source, meta, keep_blocks=1)
    keys1 = {f"blocks.1.{p}" for p in BLOCK_PARAMS}
    assert keys1 <= report.ignored and keys1 <= report.initialized and not keys1 & set(report.copied)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])
    assert not torch.equal(model.blocks[1].attn.qkv.weight, source["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.blocks[1].norm1.weight, torch.ones(32))
    assert model.blocks[1].adaLN_modulation[1].weight.abs().max() == 0


@pytest.mark.parametrize("name, kw, message", [
    ("DiT-Tiny/2", dict(), "width mismatch"),
    ("DiT-Test/2", dict(depth=3), "depth mismatch"),
    ("DiT-Test/4", dict(), "patch size"),
    ("DiT-Test/2", dict(in_channels=8), "latent channels"),
    ("DiT-Test/2", dict(norm_affine=False), "norm_affine=True"),
])
def test_mismatches_fail_clearly(export, name, kw, message):
    source, meta = export
    kw = {"norm_affine": True, **kw}
    with pytest.raises(TransferError, match=message):
        transfer_to_dit(build_model(name, input_size=32, num_classes=10, **kw), source, meta)


def test_unexpected_keys_fail(export):
    source, meta = export
    with pytest.raises(TransferError, match="decoder_embed.weight"):
        transfer_to_dit(_dit(), {**source, "decoder_embed.weight": torch.zeros(1)}, meta)
    with pytest.raises(TransferError, match="blocks.1.mlp.fc2.bias"):
        transfer_to_dit(_dit(), {k: v for k, v in source.items() if k != "blocks.1.mlp.fc2.bias"}, meta)


def test_classifier_transfer_token_and_global_pool(export):
    from timm.models.vision_transformer import VisionTransformer

    source, meta = export
    vit_args = dict(img_size=28, patch_size=2, in_chans=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    clf = VisionTransformer(**vit_args)
    report = transfer_to_classifier(clf, source, meta)
    state = clf.state_dict()
    assert set(report.copied) == set(source) - {"pos_embed"} and report.ignored == set()
    assert report.initialized == {"head.weight", "head.bias"}
    for k in report.copied:
        assert torch.equal(state[k], source[k]), k
    assert torch.equal(state["pos_embed"], source["pos_embed"])  # same grid: cls row kept, grid unchanged

    pooled = VisionTransformer(**{**vit_args, "img_size": 32}, global_pool="avg", class_token=False)
    report = transfer_to_classifier(pooled, source, meta)
    assert report.ignored == {"cls_token", "norm.weight", "norm.bias"}
    assert report.initialized == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    torch.testing.assert_close(pooled.pos_embed, resize_pos_embed(source["pos_embed"][:, 1:], 16))
