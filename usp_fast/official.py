"""Official checkpoints -> usp-fast export folders (`usp-fast import KIND SRC OUT`).

    usp   AMAP-ML/USP pretraining checkpoint (MAE format: {'model': state dict, 'epoch', 'args', ...}); the encoder
          (patch_embed, cls_token, pos_embed, blocks, norm) becomes an encoder export (encoder.safetensors +
          encoder.json, as --stage pretrain writes); the MAE decoder is dropped, as in every encoder export.
    dit   facebookresearch/DiT checkpoint: a plain state dict (DiT-XL-2-256x256.pt) or train.py's {'model', 'ema',
          'opt', 'args'}; becomes a generator folder (model.safetensors, ema.safetensors, generator.json, as
          --stage generate writes).
    sit   willisma/SiT checkpoint: the same architecture and keys as DiT (learn_sigma: 2C outputs, of which the
          objective reads the first C), sampled with the linear interpolant.

Architecture facts used (from the official code): DiT/SiT blocks are adaLN-Zero with affine-free LayerNorm
(eps 1e-6) and tanh-GELU MLPs; USP's own DiT/SiT variants add a LayerNorm affine (norm1/norm2 weights), detected by
key; the MAE encoder is a timm ViT (exact GELU, LayerNorm eps 1e-6, qkv bias). Heads are not in any tensor shape, so
the model size is found in the registry by width and depth (usp_vit_* or DiT/SiT-{XL,L,B,S,...}). The fixed sin-cos
pos_embed is stored in every official checkpoint and copied as it is.
Nothing is guessed silently: a key the layout does not name, a missing key or a shape that does not fit is a one-line
error naming the file and the keys. Provenance (file, sha256, kind, sub-dict, inferred model) goes to the export's
json under "source".
"""
import argparse
import math
import pickle
import re
from pathlib import Path

import torch

from .artifacts import _sha256, save_encoder, save_generator
from .errors import UserError

KINDS = ("usp", "dit", "sit")
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the SD-VAE the official DiT/SiT/USP models were trained on
SD_VAE_SCALE = 0.18215
VAE_STRIDE = 8
LAYOUT = {"usp": "AMAP-ML/USP (MAE) pretraining", "dit": "facebookresearch/DiT", "sit": "willisma/SiT"}

_BLOCK = r"(norm1|norm2)\.(weight|bias)|attn\.(qkv|proj)\.(weight|bias)|mlp\.(fc1|fc2)\.(weight|bias)"
# The key grammar of each official layout: anything else in the state dict is "unexpected".
GRAMMAR = {
    "usp": re.compile(r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
                      rf"|blocks\.\d+\.({_BLOCK})"
                      r"|mask_token|decoder_pos_embed|decoder_(embed|norm|pred)\.(weight|bias)"
                      rf"|decoder_blocks\.\d+\.({_BLOCK})"),
    "dit": re.compile(r"pos_embed|x_embedder\.proj\.(weight|bias)|t_embedder\.mlp\.[02]\.(weight|bias)"
                      r"|y_embedder\.embedding_table\.weight|final_layer\.(linear|adaLN_modulation\.1)\.(weight|bias)"
                      rf"|blocks\.\d+\.({_BLOCK}|adaLN_modulation\.1\.(weight|bias))"),
}
GRAMMAR["sit"] = GRAMMAR["dit"]
# Keys the model size is read from: without them nothing can be inferred.
ANCHORS = {
    "usp": ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"),
    "dit": ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight",
            "final_layer.linear.weight"),
}
ANCHORS["sit"] = ANCHORS["dit"]
DECODER_PREFIXES = ("mask_token", "decoder_")
PLAIN = "(plain state dict)"  # the "sub-dict" of a checkpoint that is a state dict itself


class OfficialCheckpointError(UserError, ValueError):
    pass


# ---- reading ----
def _first(keys, n=1):
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__


def _layout_error(src, kind, missing=(), unexpected=()):
    parts = ([f"missing {_first(missing)}"] if missing else []) + ([f"unexpected {_first(unexpected)}"]
                                                                   if unexpected else [])
    return OfficialCheckpointError(f"checkpoint {src} is not an official {LAYOUT[kind]} checkpoint: "
                                   f"{', '.join(parts)}")


def load_checkpoint(src):
    """torch.load with weights_only=True; train scripts' `args` (an argparse.Namespace) is allowed, nothing else
    that is not a tensor or a plain container."""
    src = Path(src)
    if not src.is_file():
        raise OfficialCheckpointError(f"{src} does not exist or is not a file: expected an official .pt/.pth "
                                      "checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():
            raise OfficialCheckpointError(f"{src} is not a torch checkpoint ({_line(e)})") from None
        try:  # name the objects the file would need to run code to rebuild
            found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(src) if g != "argparse.Namespace"]
        except Exception:
            found = []
        raise OfficialCheckpointError(
            f"{src} holds objects other than tensors ({', '.join(found[:3]) or 'unknown globals'}), which a "
            "weights-only load refuses: save just its state dict (torch.save(ckpt['ema'] or ckpt['model'], ...)) "
            "and import that") from None
    except Exception as e:  # a text file, a truncated zip, ...: torch's own message is not about checkpoints
        raise OfficialCheckpointError(f"{src} is not a torch checkpoint (torch.load failed: {_line(e)})") from None


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def state_dicts(obj, src, kind):
    """-> {'ema': sd, 'model': sd}, whichever the file holds, or {PLAIN: sd} for a plain state dict."""
    if _is_state_dict(obj):
        return {PLAIN: obj}
    if isinstance(obj, dict):
        found = {k: obj[k] for k in ("ema", "model") if _is_state_dict(obj.get(k))}
        if found:
            return found
        raise OfficialCheckpointError(f"checkpoint {src} is not an official {LAYOUT[kind]} checkpoint: neither a "
                                      "state dict nor a dict with 'model'/'ema' state dicts (top-level keys: "
                                      f"{_first([str(k) for k in obj], 3) or 'none'})")
    raise OfficialCheckpointError(f"checkpoint {src} is not an official {LAYOUT[kind]} checkpoint: it holds a "
                                  f"{type(obj).__name__}, expected a state dict or a dict with 'model'/'ema'")


def _check_layout(state, src, kind):
    """Unknown key names and missing anchor keys, before any size is inferred from them."""
    unexpected = [str(k) for k in state if not GRAMMAR[kind].fullmatch(str(k))]
    missing = [k for k in ANCHORS[kind] if k not in state]
    if missing or unexpected:
        raise _layout_error(src, kind, missing, unexpected)


def _check_against(model_state, state, src, kind, name, ignore=()):
    """The checkpoint must hold exactly the model's keys (minus `ignore` prefixes) with the model's shapes."""
    keys = {k for k in state if not k.startswith(ignore)} if ignore else set(state)
    missing, unexpected = set(model_state) - keys, keys - set(model_state)
    if missing or unexpected:
        raise _layout_error(src, kind, missing, unexpected)
    for k, v in model_state.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise OfficialCheckpointError(f"checkpoint {src}: {k} has shape {tuple(state[k].shape)}, {name} "
                                          f"expects {tuple(v.shape)}")


def _depth(state, prefix="blocks."):
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _grid(rows, src, prefix=0):
    g = math.isqrt(rows - prefix)
    if g * g != rows - prefix:
        raise OfficialCheckpointError(f"checkpoint {src}: pos_embed has {rows} rows, not {prefix} prefix + a square "
                                      "grid")
    return g


def _registry_size(sizes, width, depth, src, what):
    """sizes: {name: (width, depth, heads)} -> the name of the entry with this width and depth."""
    for name, (w, d, _) in sizes.items():
        if (w, d) == (width, depth):
            return name
    known = ", ".join(f"{n} {w}x{d}" for n, (w, d, _) in sizes.items())
    raise OfficialCheckpointError(f"checkpoint {src}: no {what} is {width} wide and {depth} deep (the number of heads "
                                  f"is not in the weights, so the size must be a registered one: {known})")


def _provenance(src, kind, sub, model_name, extra=None):
    return {"file": str(Path(src).resolve()), "sha256": _sha256(src), "kind": kind, "layout": LAYOUT[kind],
            "sub_dict": sub, "model": model_name, "imported_by": "usp-fast import", **(extra or {})}


def _vae_identity(vae_name, channels):
    # No fingerprint: the VAE's weights are not in the checkpoint, so only name, scale and channels are checked
    return {"name": vae_name, "scale": SD_VAE_SCALE, "latent_channels": channels, "downsample": VAE_STRIDE}


def _pick(dicts):
    """EMA weights when the file has them (the ones DiT/SiT sample with), else the raw ones."""
    sub = "ema" if "ema" in dicts else next(iter(dicts))
    return sub, dicts[sub]


# ---- USP encoder ----
def import_usp(src, out, vae=DEFAULT_VAE):
    from .models.usp_vit import MODELS, build_model

    obj = load_checkpoint(src)
    sub, state = _pick(state_dicts(obj, src, "usp"))
    _check_layout(state, src, "usp")
    w = state["patch_embed.proj.weight"]  # [D, C, p, p]
    width, chans, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = _depth(state)
    sizes = {n: (m["embed_dim"], m["depth"], m["num_heads"]) for n, m in MODELS.items()}
    name = _registry_size(sizes, width, depth, src, "usp_vit_* model")
    grid = _grid(state["pos_embed"].shape[1], src, prefix=1)
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    # MAE's timm blocks: exact GELU, LayerNorm eps 1e-6 (usp-fast's defaults, pinned here all the same)
    model = build_model(name, patch_size=patch, in_chans=chans, input_size=grid * patch, mlp_ratio=mlp_ratio,
                        mlp_act="gelu", norm_eps=1e-6)
    _check_against(model.encoder_state_dict(), state, src, "usp", name, ignore=DECODER_PREFIXES)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}, strict=False)
    epoch = obj.get("epoch") if isinstance(obj, dict) and isinstance(obj.get("epoch"), int) else None
    source = _provenance(src, "usp", sub, name, {"decoder": "dropped (an encoder export holds the encoder only)"})
    save_encoder(model, out, name, vae_identity=_vae_identity(vae, chans), resolution=grid * patch * VAE_STRIDE,
                 epoch=epoch, extra_meta={"latent_norm": {"mode": "none"}, "source": source})
    return {"kind": "usp", "model": name, "sub_dict": sub, "out": str(out)}


# ---- DiT / SiT ----
def import_generator(kind, src, out, vae=DEFAULT_VAE):
    from .models.dit import SIZES, DiT, model_config

    family = {"dit": "DiT", "sit": "SiT"}[kind]
    obj = load_checkpoint(src)
    dicts = state_dicts(obj, src, kind)
    sub, state = _pick(dicts)
    _check_layout(state, src, kind)
    w = state["x_embedder.proj.weight"]  # [D, C, p, p]
    width, chans, patch = w.shape[0], w.shape[1], w.shape[2]
    size = _registry_size(SIZES, width, _depth(state), src, f"{family} model")
    name = f"{family}-{size}/{patch}"
    grid = _grid(state["pos_embed"].shape[1], src)
    out_ch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_ch not in (chans, 2 * chans):
        raise OfficialCheckpointError(f"checkpoint {src}: final_layer.linear has {out_ch} channels per patch "
                                      f"position; expected {chans} or {2 * chans} (learn_sigma) for {chans} inputs")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    # Official models train with class_dropout_prob 0.1: the last embedding row is the null class of guidance.
    cfg = model_config(name, in_channels=chans, input_size=grid * patch, num_classes=rows - 1, class_dropout_prob=0.1,
                       learn_sigma=out_ch == 2 * chans, norm_affine="blocks.0.norm1.weight" in state,
                       mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width, mlp_act="gelu_tanh",
                       norm_eps=1e-6)
    model = DiT(cfg)
    expected = model.state_dict()
    for sd in dicts.values():  # every sub-dict that goes into the export must fit
        _check_layout(sd, src, kind)
        _check_against(expected, sd, src, kind, name)
    raw = dicts.get("model", state)
    files = {"ema.safetensors": sub, "model.safetensors": "model" if "model" in dicts else sub}
    source = _provenance(src, kind, sub, name, {"files": files})
    meta = {"model": name, "config": model.config_dict(), "objective": "ddpm" if kind == "dit" else "linear",
            "init": f"import:{kind}", "latent_channels": chans, "latent_size": grid * patch, "num_classes": rows - 1,
            "class_names": None, "resolution": grid * patch * VAE_STRIDE, "vae": _vae_identity(vae, chans),
            "ema_decay": None, "latent_norm": {"mode": "none"}, "step": None, "epoch": None, "source": source}
    save_generator(out, raw, state, meta)
    return {"kind": kind, "model": name, "sub_dict": sub, "out": str(out)}


def import_checkpoint(kind, src, out, vae=DEFAULT_VAE, overwrite=False):
    """`usp-fast import`: an official checkpoint -> a usp-fast export folder. -> summary dict."""
    if kind not in KINDS:
        raise OfficialCheckpointError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OfficialCheckpointError(f"{out} is a file: OUT is the export folder to write")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OfficialCheckpointError(f"{out} already holds files: pick another OUT or pass --overwrite")
    if kind == "usp":
        return import_usp(src, out, vae)
    return import_generator(kind, src, out, vae)
