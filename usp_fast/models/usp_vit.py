"""USP's masked-latent-modelling ViT: an MAE on VAE latents.

Encoder: PatchConv 2x2 on the latent, cls token, fixed 2-D sin-cos pos-emb, ViT blocks on the visible 25%.
Decoder: 8 x 512 blocks over all tokens (mask tokens in masked places), predicting each latent patch.
Loss: MSE on masked patches against per-patch-normalised targets (MAE's norm_pix_loss).
The fused ops (keep-gather, unshuffle, norm-pix MSE) go through the `kernels` dispatch layer.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import usp_fast_kernels as kernels

from ..hub import ExportHubMixin
from .layers import Block, GradCheckpointing, PatchEmbed, run_block, sincos_pos_embed_2d


MASK_RATIO = 0.75  # USP / MAE: three quarters of the latent patches are masked


def kept_patches(num_patches, mask_ratio):
    """How many patches the encoder sees at `mask_ratio` (MAE's int(L * (1 - ratio)))."""
    keep = int(num_patches * (1 - mask_ratio))
    if not 0 < keep <= num_patches:
        raise ValueError(f"mask ratio {mask_ratio} keeps {keep} of {num_patches} latent patches: need 0 <= ratio < 1 "
                         "with at least one patch visible")
    return keep


@dataclass
class USPViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_chans: int = 4
    input_size: int = 28  # latent side: image 224 / VAE stride 8
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = MASK_RATIO  # the training default; forward() takes another
    norm_pix: bool = True
    norm_pix_eps: float = 1e-6
    mlp_act: str = "gelu"
    norm_eps: float = 1e-6

    @property
    def grid_size(self):
        return self.input_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size**2


# Paper sizes (encoder width x depth, heads) plus small ones for demos and tests.
MODELS = {
    "usp_vit_b": dict(embed_dim=768, depth=12, num_heads=12),
    "usp_vit_l": dict(embed_dim=1024, depth=24, num_heads=16),
    "usp_vit_xl": dict(embed_dim=1152, depth=28, num_heads=16),
    "usp_vit_s": dict(embed_dim=384, depth=12, num_heads=6, decoder_dim=256, decoder_depth=4, decoder_heads=8),
    "usp_vit_tiny": dict(embed_dim=192, depth=6, num_heads=3, decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "usp_vit_test": dict(embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2),
}


def model_config(name, **overrides):
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    fields = set(USPViTConfig.__dataclass_fields__)
    bad = sorted(k for k, v in overrides.items() if k not in fields)
    if bad:
        raise KeyError(f"unknown model option(s) {bad}; valid: {sorted(fields)}")
    return USPViTConfig(**{**MODELS[name], **{k: v for k, v in overrides.items() if v is not None}})


class USPViT(GradCheckpointing, nn.Module, ExportHubMixin):
    def __init__(self, cfg: USPViTConfig):
        super().__init__()
        self.cfg = cfg
        D, Dd, L = cfg.embed_dim, cfg.decoder_dim, cfg.num_patches
        if cfg.input_size % cfg.patch_size:
            raise ValueError(f"latent size {cfg.input_size} is not divisible by patch size {cfg.patch_size}")
        self.patch_embed = PatchEmbed(cfg.in_chans, D, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # Fixed sin-cos tables are buffers: saved and exported, never trained.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.grid_size, 1)[None])
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.mlp_act, cfg.norm_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)

        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(Dd, cfg.grid_size, 1)[None])
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.mlp_act, cfg.norm_eps) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size**2 * cfg.in_chans)
        kept_patches(L, cfg.mask_ratio)  # a ratio that keeps nothing fails here, not at the first step
        self.reset_parameters()

    def reset_parameters(self):
        """MAE initialisation: xavier-uniform linears and patch conv weight (as a linear), N(0, .02) tokens. The
        patch conv's bias keeps PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in MAE/USP
        (only DiT zeroes its patch-embedding bias)."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def random_masking(self, batch, device, generator=None, mask_ratio=None):
        """Per-sample random mask by argsort of uniform noise, masking `mask_ratio` (default: the config's) of the
        patches. Returns ids_keep [B, K], ids_restore [B, L] and mask [B, L] (1 = masked)."""
        L = self.cfg.num_patches
        keep = kept_patches(L, self.cfg.mask_ratio if mask_ratio is None else mask_ratio)
        noise = torch.rand(batch, L, device=device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = (ids_restore >= keep).float()
        return ids_shuffle[:, :keep], ids_restore, mask

    def forward_encoder(self, latents, ids_keep=None):
        """Encode visible patches (all patches when ids_keep is None) -> [B, 1+K, D] after the final norm."""
        x = self.patch_embed(latents)
        pos = self.pos_embed[0, 1:]
        if ids_keep is None:
            x = x + pos.to(x.dtype)
        else:
            x = kernels.keep_gather(x, ids_keep, pos)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = run_block(blk, x, recompute=self.grad_checkpointing)
        return self.norm(x)

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        x = kernels.unshuffle(x, self.mask_token[0, 0], ids_restore, self.decoder_pos_embed[0], num_prefix=1)
        for blk in self.decoder_blocks:
            x = run_block(blk, x, recompute=self.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, latents, generator=None, mask_ratio=None, masking=None):
        """latents [B, C, H, W] -> (loss, pred [B, L, p*p*C], mask [B, L]). `masking`: random_masking's output drawn
        by the caller (under train.compile: torch.compile cannot trace a torch.Generator), else drawn here."""
        if masking is None:
            masking = self.random_masking(latents.shape[0], latents.device, generator, mask_ratio)
        ids_keep, ids_restore, mask = masking
        latent = self.forward_encoder(latents, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        loss = kernels.patch_norm_mse(pred, latents, mask, self.cfg.patch_size, self.cfg.norm_pix, self.cfg.norm_pix_eps)
        return loss, pred, mask

    # ---- encoder export: the artifact that generation and understanding stages read ----
    ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")

    def encoder_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.ENCODER_PREFIXES)}

    def encoder_config(self):
        c = asdict(self.cfg)
        keep = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "in_chans", "input_size", "mlp_act",
                "norm_eps")
        return {k: c[k] for k in keep} | {"grid_size": self.cfg.grid_size, "num_prefix_tokens": 1}

    HUB_FILES = ("encoder.safetensors", "encoder.json")

    @classmethod
    def from_pretrained(cls, export_dir, **hub_kwargs):
        """An encoder export (usp_fast.artifacts.save_encoder: a folder, its encoder.safetensors, or a hub id holding
        one; usp_fast.hub) -> (USPViT with the encoder weights, fp32, eval; the MAE decoder is not exported and stays
        freshly initialised; meta). hub_kwargs (revision, cache_dir, token, ...) go to huggingface_hub."""
        from ..hub import load

        model = load(cls, export_dir, **hub_kwargs)
        return model, model.export_meta

    @classmethod
    def _load_folder(cls, export_dir):
        from ..artifacts import ExportError, load_encoder

        tensors, meta = load_encoder(export_dir)
        c = meta["config"]
        model = build_model(meta["model"], **{k: c[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio",
                                                                  "patch_size", "in_chans", "input_size",
                                                                  "mlp_act", "norm_eps")})
        expected = set(model.encoder_state_dict())
        if expected != set(tensors):
            raise ExportError(f"{export_dir}: export does not match {meta['model']}: missing "
                              f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
        model.load_state_dict(tensors, strict=False)
        model.export_meta = meta
        return model.eval()

    def _save_folder(self, out_dir, model_name=None, vae_identity=None, resolution=None, step=None, epoch=None,
                     extra_meta=None):
        """save_pretrained(out_dir, model_name=None, **meta) -> the encoder export (usp_fast.artifacts.save_encoder,
        whose arguments `meta` are). What is not given keeps the value of the export the model was loaded from; the
        model name defaults to the registry entry of this architecture."""
        from ..artifacts import save_encoder
        from ..hub import registry_name

        old = {k: v for k, v in (self.export_meta or {}).items() if k not in ("format", "model", "config")}
        name = model_name or (self.export_meta or {}).get("model") or registry_name(MODELS, asdict(self.cfg))
        if name is None:
            raise ValueError("save_pretrained: no usp_vit_* registry entry has this architecture; pass model_name")
        given = {"vae": vae_identity, "resolution": resolution, "step": step, "epoch": epoch}
        meta = {**old, **(extra_meta or {}), **{k: v for k, v in given.items() if v is not None}}
        save_encoder(self, out_dir, name, vae_identity=meta.pop("vae", None), resolution=meta.pop("resolution", None),
                     step=meta.pop("step", None), epoch=meta.pop("epoch", None), extra_meta=meta)
        return json.loads((Path(out_dir) / "encoder.json").read_text())


def build_model(name, **overrides):
    return USPViT(model_config(name, **overrides))


def build_model_from_config(model_section, latent_channels, latent_size):
    """The USP ViT a pretrain config's `model` section describes (usp_fast.config.PretrainModelConfig): its keys
    besides `name` are USPViTConfig fields; unset ones keep the registry's value."""
    options = model_section.model_dump(exclude={"name"})
    return build_model(model_section.name, in_chans=latent_channels, input_size=latent_size, **options)


def encoder_param_count(embed_dim, depth, patch_size=2, in_chans=4, mlp_ratio=4.0):
    """Analytic trainable-parameter count of the encoder (PatchConv, cls, blocks, final norm; the sin-cos
    pos-emb is a fixed buffer). Per block: 2 LayerNorms (4D) + qkv (3D^2+3D) + proj (D^2+D) + MLP (2*D*H + H + D)."""
    D, H = embed_dim, int(embed_dim * mlp_ratio)
    block = 4 * D + 3 * D * D + 3 * D + D * D + D + 2 * D * H + H + D
    return in_chans * patch_size**2 * D + D + D + depth * block + 2 * D
