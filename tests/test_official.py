"""`usp-fast import`: official USP (MAE), DiT and SiT checkpoints -> usp-fast exports.

The checkpoints are built here in the official layouts (key names, shapes, the fixed sin-cos pos_embed they store,
the sub-dicts train scripts save) with small sizes and random weights; the imported models are compared with
reference forwards written here from the official architectures' structure, on the raw official state dicts."""
import argparse
import fractions
import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usp_fast.artifacts import load_encoder
from usp_fast.cli import main
from usp_fast.diffusion import LinearInterpolant
from usp_fast.models.dit import DiT
from usp_fast.models.usp_vit import USPViT

C, P, GRID, WIDTH, DEPTH, HEADS, CLASSES = 4, 2, 4, 32, 2, 2, 10  # DiT-Test/2 and usp_vit_test sizes
BLOCK = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


# ---- the official layouts ----
def official_sincos(dim, grid, cls_token=False):
    """MAE/DiT's get_2d_sincos_pos_embed: meshgrid(w, h), the first half from grid[0] (the column coordinate)."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(gw), one(gh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()[None]


def _linear(sd, name, fan_out, fan_in, gen, bias=True):
    sd[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5
    if bias:
        sd[f"{name}.bias"] = 0.1 * torch.randn(fan_out, generator=gen)


def _vit_block(sd, pre, d, gen, affine=True):
    _linear(sd, f"{pre}attn.qkv", 3 * d, d, gen)
    _linear(sd, f"{pre}attn.proj", d, d, gen)
    _linear(sd, f"{pre}mlp.fc1", 4 * d, d, gen)
    _linear(sd, f"{pre}mlp.fc2", d, 4 * d, gen)
    if affine:
        for n in ("norm1", "norm2"):
            sd[f"{pre}{n}.weight"] = 1 + 0.2 * torch.randn(d, generator=gen)
            sd[f"{pre}{n}.bias"] = 0.1 * torch.randn(d, generator=gen)


def dit_state(seed=0, width=WIDTH, depth=DEPTH, learn_sigma=True, affine=False):
    """facebookresearch/DiT's (and willisma/SiT's) state dict; affine=True: USP's DiT/SiT with LayerNorm affine."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"x_embedder.proj.weight": torch.randn(width, C, P, P, generator=gen) / (C * P * P) ** 0.5,
          "x_embedder.proj.bias": 0.1 * torch.randn(width, generator=gen),
          "pos_embed": official_sincos(width, GRID),
          "y_embedder.embedding_table.weight": torch.randn(CLASSES + 1, width, generator=gen)}
    _linear(sd, "t_embedder.mlp.0", width, 256, gen)
    _linear(sd, "t_embedder.mlp.2", width, width, gen)
    for i in range(depth):
        _vit_block(sd, f"blocks.{i}.", width, gen, affine)
        _linear(sd, f"blocks.{i}.adaLN_modulation.1", 6 * width, width, gen)
    _linear(sd, "final_layer.linear", P * P * C * (2 if learn_sigma else 1), width, gen)
    _linear(sd, "final_layer.adaLN_modulation.1", 2 * width, width, gen)
    return sd


def mae_state(seed=0, width=WIDTH, depth=DEPTH, dec=16):
    """AMAP-ML/USP's MaskedAutoencoderViT state dict (timm blocks) on 4-channel latents with a 2x2 patch conv."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"cls_token": 0.02 * torch.randn(1, 1, width, generator=gen),
          "pos_embed": official_sincos(width, GRID, cls_token=True),
          "patch_embed.proj.weight": torch.randn(width, C, P, P, generator=gen) / (C * P * P) ** 0.5,
          "patch_embed.proj.bias": 0.1 * torch.randn(width, generator=gen),
          "norm.weight": 1 + 0.2 * torch.randn(width, generator=gen),
          "norm.bias": 0.1 * torch.randn(width, generator=gen),
          "mask_token": 0.02 * torch.randn(1, 1, dec, generator=gen),
          "decoder_pos_embed": official_sincos(dec, GRID, cls_token=True),
          "decoder_norm.weight": torch.ones(dec), "decoder_norm.bias": torch.zeros(dec)}
    for i in range(depth):
        _vit_block(sd, f"blocks.{i}.", width, gen)
    _linear(sd, "decoder_embed", dec, width, gen)
    _vit_block(sd, "decoder_blocks.0.", dec, gen)
    _linear(sd, "decoder_pred", P * P * C, dec, gen)
    return sd


# ---- reference forwards from the official structure ----
def _attn(x, sd, pre, heads):
    B, N, D = x.shape
    qkv = F.linear(x, sd[f"{pre}qkv.weight"], sd[f"{pre}qkv.bias"]).reshape(B, N, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) * (D // heads) ** -0.5, dim=-1)
    return F.linear((a @ v).transpose(1, 2).reshape(B, N, D), sd[f"{pre}proj.weight"], sd[f"{pre}proj.bias"])


def _mlp(x, sd, pre, approximate):
    h = F.gelu(F.linear(x, sd[f"{pre}fc1.weight"], sd[f"{pre}fc1.bias"]), approximate=approximate)
    return F.linear(h, sd[f"{pre}fc2.weight"], sd[f"{pre}fc2.bias"])


def _ln(x, sd, name):  # affine when the state dict has the weights (eps 1e-6 everywhere)
    return F.layer_norm(x, x.shape[-1:], sd.get(f"{name}.weight"), sd.get(f"{name}.bias"), eps=1e-6)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def reference_dit(sd, x, t, y, heads=HEADS):
    """DiT.forward: patchify conv + stored pos_embed; c = MLP(SiLU)(sinusoid_256(t)) + label embedding; adaLN-Zero
    blocks (6-way chunk: shift/scale/gate for attention and MLP, LayerNorm eps 1e-6, tanh-GELU MLP); final layer
    (2-way adaLN, linear); unpatchify to [B, out_channels, H, W]."""
    p = sd["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        pre = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[f"{pre}adaLN_modulation.1.weight"], sd[f"{pre}adaLN_modulation.1.bias"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = h + gate_msa[:, None] * _attn(_modulate(_ln(h, sd, f"{pre}norm1"), shift_msa, scale_msa), sd,
                                          f"{pre}attn.", heads)
        h = h + gate_mlp[:, None] * _mlp(_modulate(_ln(h, sd, f"{pre}norm2"), shift_mlp, scale_mlp), sd, f"{pre}mlp.",
                                         "tanh")
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(_modulate(F.layer_norm(h, h.shape[-1:], eps=1e-6), shift, scale), sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    B, T, _ = out.shape
    g, ch = math.isqrt(T), out.shape[-1] // (p * p)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, ch))
    return out.reshape(B, ch, g * p, g * p)


def reference_mae_encoder(sd, x, heads=HEADS):
    """MaskedAutoencoderViT.forward_encoder without masking: patch conv + pos_embed[1:], cls token + pos_embed[0],
    pre-norm timm blocks (exact GELU, LayerNorm eps 1e-6), final norm."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"][:, 1:]
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    h = torch.cat([cls, h], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        pre = f"blocks.{i}."
        h = h + _attn(_ln(h, sd, f"{pre}norm1"), sd, f"{pre}attn.", heads)
        h = h + _mlp(_ln(h, sd, f"{pre}norm2"), sd, f"{pre}mlp.", "none")
    return _ln(h, sd, "norm")


def _inputs(seed=1, sit=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, C, GRID * P, GRID * P, generator=gen)
    t = torch.rand(3, generator=gen) if sit else torch.randint(0, 1000, (3,), generator=gen)
    y = torch.tensor([0, 7, CLASSES])  # the last row is the null class of guidance
    return x, t, y


def _import(capsys, kind, src, out, *extra):
    r = main(["import", kind, str(src), str(out), *extra])
    assert "imported" in capsys.readouterr().out
    return r


def _one_line_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(["import", *map(str, argv)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# ---- DiT ----
@pytest.mark.parametrize("affine", [False, True], ids=["DiT", "USP-DiT-affine-norms"])
def test_imported_dit_computes_the_official_forward(tmp_path, capsys, one_thread, affine):
    sd = dit_state(affine=affine)
    src = tmp_path / "DiT-Test-2.pt"
    torch.save(sd, src)  # DiT-XL-2-256x256.pt is a plain state dict
    _import(capsys, "dit", src, tmp_path / "out")
    model, meta = DiT.from_pretrained(tmp_path / "out")  # the project's own loader reads the export
    c = model.cfg
    assert (meta["model"], c.family, c.learn_sigma, c.norm_affine, c.mlp_act) == ("DiT-Test/2", "DiT", True, affine,
                                                                                  "gelu_tanh")
    assert (c.num_classes, c.null_class, c.input_size, meta["objective"]) == (CLASSES, CLASSES, GRID * P, "ddpm")
    x, t, y = _inputs()
    with torch.no_grad():
        got, want = model(x, t, y), reference_dit(sd, x, t, y)
    assert got.shape == (3, 2 * C, GRID * P, GRID * P) and want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    src_meta = meta["source"]
    assert src_meta["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() and src_meta["kind"] == "dit"
    assert src_meta["file"] == str(src.resolve()) and src_meta["model"] == "DiT-Test/2"
    assert src_meta["sub_dict"] == "(plain state dict)"


def test_ema_is_preferred_over_model_and_both_are_kept(tmp_path, capsys, one_thread):
    ema, raw = dit_state(seed=0), dit_state(seed=5)
    src = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4)}, src)  # as DiT's train.py saves
    _import(capsys, "dit", src, tmp_path / "out")
    x, t, y = _inputs()
    model, meta = DiT.from_pretrained(tmp_path / "out")
    raw_model, _ = DiT.from_pretrained(tmp_path / "out", ema=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_dit(ema, x, t, y), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(raw_model(x, t, y), reference_dit(raw, x, t, y), rtol=1e-4, atol=1e-5)
    assert meta["source"]["sub_dict"] == "ema"
    assert meta["source"]["files"] == {"ema.safetensors": "ema", "model.safetensors": "model"}


# ---- SiT ----
def test_imported_sit_computes_the_official_forward(tmp_path, capsys, one_thread):
    sd = dit_state(seed=3)
    src = tmp_path / "SiT-Test-2.pt"
    torch.save({"ema": sd}, src)
    _import(capsys, "sit", src, tmp_path / "out")
    model, meta = DiT.from_pretrained(tmp_path / "out")
    assert (meta["model"], model.cfg.family, model.cfg.learn_sigma, meta["objective"]) == ("SiT-Test/2", "SiT", True,
                                                                                          "linear")
    x, t, y = _inputs(sit=True)
    with torch.no_grad():  # SiT's forward returns the first C of the 2C channels; the objective reads those
        got, want = model(x, t, y)[:, :C], reference_dit(sd, x, t, y)[:, :C]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The weights mean the same thing only under SiT's own time convention (t = 1 data, velocity data - noise)
    x1, noise = torch.randn(2, C, 4, 4), torch.randn(2, C, 4, 4)
    assert torch.equal(LinearInterpolant.interpolate(x1, noise, torch.ones(2)), x1)
    assert torch.equal(LinearInterpolant.velocity_target(x1, noise), x1 - noise)


# ---- USP encoder ----
def test_imported_usp_encoder_computes_the_mae_encoder(tmp_path, capsys, one_thread):
    sd = mae_state()
    src = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="vit_base_patch_vae", mask_ratio=0.75)}, src)  # misc.save_model
    _import(capsys, "usp", src, tmp_path / "export")
    tensors, meta = load_encoder(tmp_path / "export")  # what generate/finetune/probe read
    assert not any(k.startswith(("decoder", "mask_token")) for k in tensors)
    assert torch.equal(tensors["pos_embed"], sd["pos_embed"]) and torch.equal(tensors["blocks.1.mlp.fc2.weight"],
                                                                              sd["blocks.1.mlp.fc2.weight"])
    model, meta = USPViT.from_pretrained(tmp_path / "export")
    assert (meta["model"], meta["config"]["num_heads"], meta["config"]["mlp_act"], meta["epoch"]) == (
        "usp_vit_test", HEADS, "gelu", 799)
    assert meta["source"]["sub_dict"] == "model" and meta["source"]["kind"] == "usp"
    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    x = torch.randn(2, C, GRID * P, GRID * P, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model.forward_encoder(x), reference_mae_encoder(sd, x)
    assert got.shape == (2, 1 + GRID * GRID, WIDTH)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---- refusals: one line, exit 2 ----
def test_an_unknown_layout_is_one_line_naming_the_file_and_keys(tmp_path, capsys):
    src = tmp_path / "mystery.pt"
    torch.save({"foo.bar": torch.zeros(2), "x_embedder.proj.weight": torch.zeros(32, 4, 2, 2)}, src)
    err = _one_line_error(capsys, "dit", src, tmp_path / "out")
    assert f"checkpoint {src} is not an official facebookresearch/DiT checkpoint" in err
    assert "missing 'blocks.0.mlp.fc1.weight' (+3 more)" in err and "unexpected 'foo.bar'" in err
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    src = tmp_path / "notes.pt"
    src.write_text("not a checkpoint\n")
    err = _one_line_error(capsys, "sit", src, tmp_path / "out")
    assert f"{src} is not a torch checkpoint" in err


def test_a_usp_checkpoint_imported_as_dit_names_the_mismatch(tmp_path, capsys):
    src = tmp_path / "usp.pth"
    torch.save({"model": mae_state()}, src)
    err = _one_line_error(capsys, "dit", src, tmp_path / "out")
    assert "not an official facebookresearch/DiT checkpoint" in err and "missing 'final_layer.linear.weight'" in err
    assert "unexpected 'cls_token' (+" in err


def test_a_checkpoint_missing_one_tensor_is_refused(tmp_path, capsys):
    sd = dit_state()
    del sd["blocks.1.mlp.fc2.bias"]
    src = tmp_path / "cut.pt"
    torch.save(sd, src)
    err = _one_line_error(capsys, "dit", src, tmp_path / "out")
    assert "missing 'blocks.1.mlp.fc2.bias'" in err and "unexpected" not in err


def test_an_unregistered_size_is_refused_as_heads_are_unknown(tmp_path, capsys):
    src = tmp_path / "wide.pt"
    torch.save(dit_state(width=48), src)
    err = _one_line_error(capsys, "dit", src, tmp_path / "out")
    assert "no DiT model is 48 wide and 2 deep" in err and "Test 32x2" in err


def test_a_non_tensor_object_is_refused_by_the_weights_only_load(tmp_path, capsys):
    src = tmp_path / "pickled.pt"
    torch.save({"ema": dit_state(), "args": fractions.Fraction(1, 3)}, src)
    err = _one_line_error(capsys, "dit", src, tmp_path / "out")
    assert "fractions.Fraction" in err and "weights-only" in err


def test_an_existing_out_folder_is_not_overwritten_without_asking(tmp_path, capsys, one_thread):
    src = tmp_path / "dit.pt"
    torch.save(dit_state(), src)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = _one_line_error(capsys, "dit", src, tmp_path / "out")
    assert "--overwrite" in err and not (tmp_path / "out" / "generator.json").exists()
    _import(capsys, "dit", src, tmp_path / "out", "--overwrite")
    assert (tmp_path / "out" / "generator.json").is_file()
