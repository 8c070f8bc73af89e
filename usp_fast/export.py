"""The pretrained-encoder artifact: `<dir>/encoder.safetensors` + `<dir>/encoder.json`.

Tensors (timm ViT names): patch_embed.proj.{weight [D,C,p,p], bias}, cls_token [1,1,D],
pos_embed [1,1+g*g,D] (fixed sin-cos, cls row first), blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}
.{weight,bias}, norm.{weight,bias}.
JSON: {"format": "usp-fast-encoder/1", "model": registry name, "config": {embed_dim, depth, num_heads, mlp_ratio,
patch_size, in_chans, input_size, grid_size, num_prefix_tokens, mlp_act, norm_eps}, "vae": VAE identity,
"resolution": image side, "step": optimizer step, "epoch": float}.
"""
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .io import atomic_write_text, atomic_path

FORMAT = "usp-fast-encoder/1"


def save_encoder(model, out_dir, model_name, vae_identity=None, resolution=None, step=None, epoch=None):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.encoder_state_dict().items()}
    with atomic_path(out_dir / "encoder.safetensors") as tmp:
        save_file(tensors, str(tmp))
    meta = {"format": FORMAT, "model": model_name, "config": model.encoder_config(), "vae": vae_identity,
            "resolution": resolution, "step": step, "epoch": epoch}
    atomic_write_text(out_dir / "encoder.json", json.dumps(meta, indent=2))
    return out_dir


def load_encoder(path):
    """-> (state_dict, meta). `path` is the export directory or its encoder.safetensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected an encoder export folder from --stage pretrain "
                                "(runs/<name>/export)")
    d = path if path.is_dir() else path.parent
    st, js = d / "encoder.safetensors", d / "encoder.json"
    for f in (st, js):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: expected an encoder export from --stage pretrain")
    meta = json.loads(js.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{js}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return load_file(str(st)), meta
