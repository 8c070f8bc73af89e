"""DiT / SiT: class-conditional diffusion transformers on VAE latents (Peebles & Xie 2023; Ma et al. 2024).

One backbone serves both families; they differ only in the objective (usp_fast/diffusion) and in the default of
`learn_sigma` (DiT: 2C outputs, epsilon + variance interpolation; SiT: C outputs, velocity).

    x [B, C, H, W] -> x_embedder (PatchConv p x p) + fixed pos-emb -> depth x adaLN-Zero block -> final layer
    c = t_embedder(t) + y_embedder(y)   conditions every block through its adaLN modulation (SiLU + Linear)

Parameter names follow the official DiT/SiT code (x_embedder.proj, t_embedder.mlp.{0,2}, y_embedder.embedding_table,
blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,adaLN_modulation.1}, final_layer.{linear,
adaLN_modulation.1}) so published checkpoints load by name, and the block internals share the USP ViT's names so
`usp_fast.transfer` copies them one to one.

Variants (DiTConfig):
  norm_affine  False: DiT's LayerNorm without affine. True: USP's trainable LayerNorm affine in norm1/norm2, restored
               from the pretrained ViT (the final layer's norm stays affine-free: the ViT's final norm is not used).
  mlp_act      'gelu_tanh' (DiT's MLP, also the official USP DiT/SiT from a USP start, so a USP arm and a
               scratch arm share one architecture) or 'gelu' (exact, what the USP ViT pretrains with; opt in with
               generate.mlp_act=gelu).
LayerNorm + modulate and the gated residuals run through the `kernels` dispatch; attention through
usp_fast.models.attention (FlashAttention-3 / -2 when installed, else SDPA).
"""
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

import usp_fast_kernels as kernels

from ..hub import ExportHubMixin
from .layers import Attention, GradCheckpointing, Mlp, PatchEmbed, run_block, sincos_pos_embed_2d, unpatchify


@dataclass
class DiTConfig:
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 2
    family: str = "DiT"         # 'DiT' (DDPM, epsilon + learned sigma) or 'SiT' (linear interpolant, velocity)
    mlp_ratio: float = 4.0
    in_channels: int = 4        # SD-VAE latent channels
    input_size: int = 32        # latent side: 256 px / VAE stride 8
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance; > 0 adds the null class row
    learn_sigma: bool = None    # None: True for DiT, False for SiT
    norm_affine: bool = False
    mlp_act: str = "gelu_tanh"
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.family not in ("DiT", "SiT"):
            raise ValueError(f"family {self.family!r}: expected 'DiT' or 'SiT'")
        if self.learn_sigma is None:
            self.learn_sigma = self.family == "DiT"
        if self.input_size % self.patch_size:
            raise ValueError(f"latent size {self.input_size} is not divisible by patch size {self.patch_size}")

    @property
    def out_channels(self):
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def grid_size(self):
        return self.input_size // self.patch_size

    @property
    def null_class(self):
        """Label index of the unconditional (dropped) class, or None without label dropout."""
        return self.num_classes if self.class_dropout_prob > 0 else None


# width, depth, heads. XL/L/B/S are the paper sizes; Tiny and Test are NOT paper sizes: they match usp_vit_tiny
# and usp_vit_test so demos and tests can run the whole pretrain -> transfer -> generate chain on a CPU.
SIZES = {
    "XL": (1152, 28, 16),
    "L": (1024, 24, 16),
    "B": (768, 12, 12),
    "S": (384, 12, 6),
    "Tiny": (192, 6, 3),   # non-paper (demo)
    "Test": (32, 2, 2),    # non-paper (tests)
}
MODELS = {
    f"{family}-{size}/{patch}": dict(hidden_size=w, depth=d, num_heads=h, patch_size=patch, family=family)
    for family in ("DiT", "SiT") for size, (w, d, h) in SIZES.items() for patch in (2, 4, 8)
}


def model_config(name, **overrides):
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    fields = set(DiTConfig.__dataclass_fields__)
    bad = sorted(k for k in overrides if k not in fields)
    if bad:
        raise KeyError(f"unknown DiT option(s) {bad}; valid: {sorted(fields)}")
    return DiTConfig(**{**MODELS[name], **{k: v for k, v in overrides.items() if v is not None}})


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (integer DDPM steps or continuous SiT times) -> [B, D]: sinusoidal features + MLP."""

    def __init__(self, dim, frequency_dim=256, max_period=10000):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, t):
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> [B, D]. Index `num_classes` is the null class of classifier-free guidance; which labels are
    dropped to it during training is decided by the caller with `drop_labels` (so the randomness comes from the
    training loop's generator)."""

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels):
        return self.embedding_table(labels)


def drop_labels(labels, prob, null_class, generator=None):
    """Replace each label by `null_class` with probability `prob` (DiT's class dropout for CFG)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate_msa * attn(LN1(x)*(1+scale_msa)+shift_msa); then the same with the MLP.

    The block receives its attention input already normalised and modulated (`h`) and returns the next consumer's
    normalised, modulated input together with the residual stream, so each residual add is fused with the LayerNorm
    that follows it (kernels.gate_residual_ln_modulate): one pass over x per branch instead of two.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, act="gelu_tanh", affine=False, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, c):
        """-> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, D]."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x, h, mod, next_norm, next_shift, next_scale):
        """x: residual stream; h: this block's modulated norm1(x); mod: self.modulation(c).
        -> (x_out, next_norm(x_out) * (1 + next_scale) + next_shift)."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        n2 = self.norm2
        x, h = kernels.gate_residual_ln_modulate(x, gate_msa, self.attn(h), shift_mlp, scale_mlp, n2.weight, n2.bias,
                                                 n2.eps)
        return kernels.gate_residual_ln_modulate(x, gate_mlp, self.mlp(h), next_shift, next_scale, next_norm.weight,
                                                 next_norm.bias, next_norm.eps)


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels, eps=1e-6):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch_size**2 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, c):
        return self.adaLN_modulation(c).chunk(2, dim=1)


class DiT(GradCheckpointing, nn.Module, ExportHubMixin):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Fixed table: a buffer (saved, never trained). A USP init overwrites it with the resized ViT table.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.grid_size)[None])
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.mlp_act, cfg.norm_affine, cfg.norm_eps)
            for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels, cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """DiT's initialisation; adaLN modulations and the output layer start at zero, so every block starts as the
        identity and the model outputs zeros."""
        _init_linears_and_norms(self)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.grid_size)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv is initialised as the linear it is
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            self.reset_block(block)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    @staticmethod
    @torch.no_grad()
    def reset_block(block):
        """A block's fresh DiT initialisation (xavier linears, unit LayerNorm affine, zero adaLN modulation)."""
        _init_linears_and_norms(block)
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def forward(self, x, t, y):
        """x [B, C, H, W] latents, t [B] timesteps, y [B] labels (null class allowed) -> [B, out_channels, H, W]."""
        h, _ = self._trunk(x, t, y)
        return unpatchify(self.final_layer.linear(h), self.cfg.patch_size, self.cfg.out_channels)

    def block_features(self, x, t, y, blocks):
        """The residual stream after each listed block, averaged over tokens: {i: [B, D]} (per-block probe)."""
        _, kept = self._trunk(x, t, y, keep=set(blocks))
        return {i: v.mean(1) for i, v in kept.items()}

    def _trunk(self, x, t, y, keep=()):
        """-> (modulated final-norm input of the final layer, {i: residual stream after block i for i in keep})."""
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        mods = [block.modulation(c) for block in self.blocks]
        # Each block hands over the modulated LayerNorm of its output to the next consumer (next block, final layer).
        nexts = [(b.norm1, m[0], m[1]) for b, m in zip(self.blocks[1:], mods[1:])]
        nexts.append((self.final_layer.norm_final, *self.final_layer.modulation(c)))
        first = self.blocks[0].norm1
        h = kernels.ln_modulate(tokens, mods[0][0], mods[0][1], first.weight, first.bias, first.eps)
        kept = {}
        for i, (block, mod, (norm, shift, scale)) in enumerate(zip(self.blocks, mods, nexts)):
            tokens, h = run_block(block, tokens, h, mod, norm, shift, scale, recompute=self.grad_checkpointing)
            if i in keep:
                kept[i] = tokens
        return h, kept

    def config_dict(self):
        return asdict(self.cfg)

    @classmethod
    def from_pretrained(cls, path, ema=True, **hub_kwargs):
        """A generator/ folder, a checkpoint folder of a generate run, or a hub id holding a generator folder
        (usp_fast.hub) -> (DiT/SiT on CPU, fp32, eval, frozen; meta). `ema`: the EMA weights (the ones to sample
        with) or the raw ones. hub_kwargs (revision, cache_dir, token, ...) go to huggingface_hub."""
        from ..hub import load

        model = load(cls, path, ema=ema, **hub_kwargs)
        return model, model.export_meta

    @classmethod
    def hub_files(cls, ema=True, **_):
        return ["generator.json", "ema.safetensors" if ema else "model.safetensors"]

    @classmethod
    def _load_folder(cls, path, ema=True):
        from ..artifacts import load_generator_weights

        state, meta = load_generator_weights(path, ema)
        model = cls(DiTConfig(**meta["config"]))
        model.load_state_dict(state)
        model.export_meta = meta
        return model.eval().requires_grad_(False)

    def _save_folder(self, out_dir, meta=None, ema_state=None):
        """save_pretrained(out_dir, meta=None, ema_state=None) -> a generator folder
        (usp_fast.artifacts.save_generator): this model's weights as model.safetensors and, unless `ema_state` is
        given, as ema.safetensors too; generator.json from `meta` over the loaded folder's, "config" this model's."""
        from ..artifacts import GENERATOR_FORMAT, save_generator
        from ..diffusion import default_objective
        from ..hub import registry_name

        c = self.cfg
        m = {k: v for k, v in {**(self.export_meta or {}), **(meta or {})}.items() if k != "format"}
        m["config"] = self.config_dict()
        m.setdefault("model", registry_name(MODELS, m["config"]) or f"{c.family}-custom")
        m.setdefault("objective", default_objective(c.family))
        for k, v in (("latent_channels", c.in_channels), ("latent_size", c.input_size), ("num_classes", c.num_classes)):
            m.setdefault(k, v)
        weights = self.state_dict()
        save_generator(out_dir, weights, weights if ema_state is None else ema_state, m)
        return {"format": GENERATOR_FORMAT, **m}


def _init_linears_and_norms(module):
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(name, **overrides):
    return DiT(model_config(name, **overrides))
