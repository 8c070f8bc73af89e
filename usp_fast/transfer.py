"""Pretrained USP encoder (the export of --stage pretrain, usp_fast.artifacts.save_encoder) -> DiT/SiT for generation, or -> a ViT classifier for the
understanding stages. Every key is accounted for: a transfer returns a TransferReport with the exact sets of copied,
ignored and freshly initialised keys, and anything the tables below do not expect is an error.

Encoder -> DiT/SiT (USP's recipe: keep adaLN-Zero, restore the ViT's trainable LayerNorm affine):

    encoder (export)                  DiT/SiT                            how
    patch_embed.proj.{weight,bias}    x_embedder.proj.{weight,bias}      copy (channels and patch size must match)
    pos_embed [1, 1+g*g, D]           pos_embed [1, G*G, D]              drop the cls row, bicubic-resize g -> G
    blocks.{i}.norm1.{weight,bias}    blocks.{i}.norm1.{weight,bias}     copy (needs norm_affine=True)
    blocks.{i}.attn.qkv / attn.proj   blocks.{i}.attn.qkv / attn.proj    copy
    blocks.{i}.norm2.{weight,bias}    blocks.{i}.norm2.{weight,bias}     copy
    blocks.{i}.mlp.fc1 / mlp.fc2      blocks.{i}.mlp.fc1 / mlp.fc2       copy
    cls_token, norm.{weight,bias}     -                                  ignored (DiT has no cls token; the final
                                                                         encoder norm is not used)
    -                                 t_embedder.*, y_embedder.*,        DiT's initialisation kept: adaLN modulation
                                      blocks.{i}.adaLN_modulation.*,     and final layer zero, so each block starts as
                                      final_layer.*                      the identity (adaLN-Zero)
With keep_blocks=N (paper Table 8g) only blocks 0..N-1 are copied; the source blocks N.. are ignored and the target
blocks N.. are re-initialised as a fresh DiT block. The MAE decoder and mask token are not part of the export.

Encoder -> ViT classifier (timm VisionTransformer names, or any module using them): patch_embed, cls_token,
pos_embed (prefix rows kept when the target has them, grid resized), blocks and the final norm are copied; head.*
and fc_norm.* (MAE's global-pool norm) stay freshly initialised. A target without `norm` (global pool) ignores it.
"""
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import UserError

log = logging.getLogger(__name__)

BLOCK_PARAMS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)
PATCH_TO_DIT = {"patch_embed.proj.weight": "x_embedder.proj.weight", "patch_embed.proj.bias": "x_embedder.proj.bias"}
UNUSED_BY_DIT = ("cls_token", "norm.weight", "norm.bias")
# Target keys that keep DiT's own initialisation (block modulation listed per block below).
DIT_FRESH_PREFIXES = ("t_embedder.", "y_embedder.", "final_layer.")
CLASSIFIER_FRESH_PREFIXES = ("head.", "fc_norm.")


class TransferError(UserError, ValueError):
    pass


@dataclass
class TransferReport:
    copied: dict = field(default_factory=dict)       # target key -> source key (exact copies)
    resized: dict = field(default_factory=dict)      # target key -> "source key: how"
    ignored: set = field(default_factory=set)        # source keys not used
    initialized: set = field(default_factory=set)    # target keys left with (or reset to) their fresh initialisation
    notes: list = field(default_factory=list)        # choices that change what was copied

    def as_dict(self):
        return {"copied": dict(sorted(self.copied.items())), "resized": dict(sorted(self.resized.items())),
                "ignored": sorted(self.ignored), "initialized": sorted(self.initialized), "notes": self.notes}

    def summary(self):
        def fold(keys):  # blocks.3.attn.qkv.weight, blocks.4... -> blocks.{3,4}.attn.qkv.weight
            groups = {}
            for k in sorted(keys):
                parts = k.split(".")
                if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
                    groups.setdefault("blocks.{}." + ".".join(parts[2:]), []).append(int(parts[1]))
                else:
                    groups[k] = None
            out = []
            for pattern, idx in groups.items():
                if idx is None:
                    out.append(pattern)
                else:
                    idx = sorted(idx)
                    rng = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 \
                        else ",".join(map(str, idx))
                    out.append(pattern.format("{" + rng + "}"))
            return out

        lines = [f"copied {len(self.copied)} tensors exactly, resized {len(self.resized)}, "
                 f"ignored {len(self.ignored)} source keys, kept fresh init for {len(self.initialized)} target keys"]
        lines += [f"  note:        {n}" for n in self.notes]
        lines += [f"  copied:      {k}" for k in fold(self.copied)]
        lines += [f"  resized:     {k} <- {v}" for k, v in sorted(self.resized.items())]
        lines += [f"  ignored:     {k}" for k in fold(self.ignored)]
        lines += [f"  initialized: {k}" for k in fold(self.initialized)]
        return "\n".join(lines)


def check_same_latents(export_meta, manifest, latent_norm, export_path):
    """A stage initialised from an encoder export must read the latents it was pretrained on: the same
    vae.normalize mode, and the VAE fingerprint, scale and channels of the data source's manifest."""
    from .vae import LatentNorm

    src, dst = export_meta.get("vae"), manifest.get("vae") or {}
    if not src:
        log.warning("encoder export %s records no VAE identity; cannot check it matches the cache's", export_path)
        return
    src_norm, dst_norm = LatentNorm.of(export_meta).mode, latent_norm.mode
    if src_norm != dst_norm:
        raise TransferError(f"the encoder at {export_path} was pretrained with vae.normalize={src_norm}, this run "
                            f"uses vae.normalize={dst_norm}: both stages must see the same latents")
    for key in ("fingerprint", "scale", "latent_channels"):
        if key in src and key in dst and src[key] != dst[key]:
            raise TransferError(f"the encoder at {export_path} was pretrained on latents of VAE {src.get('name')!r} "
                             f"({key} {src[key]!r}), but the training data is encoded with {dst.get('name')!r} "
                             f"({key} {dst[key]!r}): the two stages must use the same latent space")


POS_INTERP = ("bicubic", "bilinear")


def resize_pos_embed(grid_table, new_grid, mode="bicubic"):
    """Position table [1, g*g, D] (no prefix rows) -> [1, G*G, D] by bicubic (or bilinear, the paper's 512 px
    setting) interpolation of the g x g grid (align_corners=False, as timm/MAE; at G == g the identity)."""
    if mode not in POS_INTERP:
        raise TransferError(f"position-embedding interpolation {mode!r}: expected one of {', '.join(POS_INTERP)}")
    _, n, dim = grid_table.shape
    g = math.isqrt(n)
    if g * g != n:
        raise TransferError(f"pos_embed has {n} grid rows, not a square grid")
    grid = grid_table.float().reshape(1, g, g, dim).permute(0, 3, 1, 2)
    if new_grid != g:
        grid = F.interpolate(grid, size=(new_grid, new_grid), mode=mode, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(grid_table.dtype)


def _split_pos_embed(source, meta):
    """-> (prefix rows [1, P, D], grid rows [1, g*g, D]) of the export's pos_embed."""
    pos = source["pos_embed"]
    cfg = meta["config"]
    prefix, g = int(cfg.get("num_prefix_tokens", 1)), int(cfg["grid_size"])
    if pos.shape[1] != prefix + g * g:
        raise TransferError(f"export pos_embed has {pos.shape[1]} rows; its config says {prefix} prefix + {g}x{g} grid")
    return pos[:, :prefix], pos[:, prefix:]


def _check_patch_embed(source, target_weight, what):
    w = source["patch_embed.proj.weight"]
    if w.shape[1] != target_weight.shape[1]:
        raise TransferError(f"{what}: the encoder's PatchConv reads {w.shape[1]} latent channels, the target "
                            f"{target_weight.shape[1]}: the two must use the same VAE latent space")
    if w.shape[2:] != target_weight.shape[2:]:
        raise TransferError(f"{what}: the encoder's patch size is {tuple(w.shape[2:])}, the target's "
                            f"{tuple(target_weight.shape[2:])}; pick a model with the same patch size "
                            f"(e.g. DiT-*/{w.shape[2]})")


def _check_shapes_and_copy(target_state, source, plan, report, what):
    """plan: {target key: source key or a ready tensor (with its description)}; copies into target_state tensors."""
    for tkey, (skey, tensor, how) in plan.items():
        dst = target_state[tkey]
        src = source[skey] if tensor is None else tensor
        if src.shape != dst.shape:
            raise TransferError(f"{what}: {skey} {tuple(src.shape)} does not fit {tkey} {tuple(dst.shape)}")
    with torch.no_grad():
        for tkey, (skey, tensor, how) in plan.items():
            target_state[tkey].copy_(source[skey] if tensor is None else tensor)
            if how is None:
                report.copied[tkey] = skey
            else:
                report.resized[tkey] = f"{skey}: {how}"


def _account(source, target_state, plan, ignored, fresh, report, what):
    """Fail on any source key neither used nor expected-unused, and any target key neither written nor expected
    to keep its initialisation."""
    used = {skey for skey, _, _ in plan.values()}
    missing = sorted((used | set(ignored)) - set(source))
    if missing:
        raise TransferError(f"{what}: the export lacks expected keys {missing}")
    unexpected_src = sorted(set(source) - used - set(ignored))
    unexpected_dst = sorted(set(target_state) - set(plan) - set(fresh))
    if unexpected_src or unexpected_dst:
        raise TransferError(f"{what}: unexpected keys; encoder keys with no destination: {unexpected_src or 'none'}; "
                            f"target keys with no source and no planned initialisation: {unexpected_dst or 'none'}")
    report.ignored = set(ignored)
    report.initialized = set(fresh)


def _resize_how(g_src, g_dst, mode):
    return f"{mode} {g_src}x{g_src} -> {g_dst}x{g_dst}" if g_src != g_dst else f"{g_src}x{g_src} grid kept (no resize)"


def transfer_to_dit(model, source, meta, keep_blocks=None, copy_norms=True, pos_interp="bicubic"):
    """Copy a USP encoder (state dict + meta from load_encoder) into a freshly built DiT/SiT, in place.
    keep_blocks: copy only blocks 0..N-1 and re-initialise the rest (None: all). copy_norms=False leaves every
    block's LayerNorm affine at its fresh init (ones, zeros) instead of the ViT's (paper Table 8b). -> report."""
    cfg, ecfg = model.cfg, meta["config"]
    what = f"transfer {meta.get('model', 'encoder')} -> {cfg.family}"
    for name, src, dst in (("width", ecfg["embed_dim"], cfg.hidden_size), ("depth", ecfg["depth"], cfg.depth),
                           ("heads", ecfg["num_heads"], cfg.num_heads), ("mlp_ratio", ecfg["mlp_ratio"], cfg.mlp_ratio)):
        if src != dst:
            raise TransferError(f"{what}: {name} mismatch: the encoder has {src}, the target model {dst}; pick the "
                                f"generation model matching the encoder (e.g. usp_vit_b -> DiT-B/2, usp_vit_l -> "
                                f"DiT-L/2, usp_vit_xl -> DiT-XL/2)")
    if copy_norms and not cfg.norm_affine:
        raise TransferError(f"{what}: the target uses DiT's affine-free LayerNorm, so the ViT's LayerNorm weights "
                            "have nowhere to go; build it with norm_affine=True (USP's variant)")
    if ecfg.get("mlp_act", "gelu") != cfg.mlp_act:
        log.info("%s: the encoder's MLPs were trained with %s, the target uses %s (as the official USP DiT)", what,
                 ecfg.get("mlp_act", "gelu"), cfg.mlp_act)
    n_keep = cfg.depth if keep_blocks is None else int(keep_blocks)
    if not 0 <= n_keep <= cfg.depth:
        raise TransferError(f"{what}: keep_blocks={keep_blocks} is outside 0..{cfg.depth}")

    target_state = model.state_dict(keep_vars=True)
    _check_patch_embed(source, target_state["x_embedder.proj.weight"], what)
    _, grid = _split_pos_embed(source, meta)
    g_src = math.isqrt(grid.shape[1])
    plan = {t: (s, None, None) for s, t in PATCH_TO_DIT.items()}
    plan["pos_embed"] = ("pos_embed", resize_pos_embed(grid, cfg.grid_size, pos_interp),
                         f"cls row dropped, {_resize_how(g_src, cfg.grid_size, pos_interp)}")
    ignored = list(UNUSED_BY_DIT)
    fresh = [k for k in target_state if k.startswith(DIT_FRESH_PREFIXES)]
    for i in range(cfg.depth):
        block_keys = [f"blocks.{i}.{p}" for p in BLOCK_PARAMS]
        fresh += [k for k in target_state if k.startswith(f"blocks.{i}.adaLN_modulation.")]
        if i < n_keep:
            norms = [k for k in block_keys if ".norm" in k]
            if copy_norms:
                plan.update({k: (k, None, None) for k in block_keys})
            else:  # Table 8b: the LayerNorm affine stays fresh (absent from a norm_affine=False target)
                plan.update({k: (k, None, None) for k in block_keys if k not in norms})
                ignored += norms
                fresh += [k for k in norms if k in target_state]
        else:
            ignored += block_keys
            fresh += block_keys
    report = TransferReport()
    report.notes = [] if copy_norms else ["LayerNorm affine NOT transferred (copy_norms=False): block norms keep "
                                          "their fresh initialisation"]
    _account(source, target_state, plan, ignored, fresh, report, what)
    for i in range(n_keep, cfg.depth):
        model.reset_block(model.blocks[i])
    _check_shapes_and_copy(target_state, source, plan, report, what)
    return report


def transfer_to_classifier(model, source, meta):
    """Copy a USP encoder into a ViT classifier with timm names (patch_embed, cls_token, pos_embed, blocks, norm,
    fc_norm, head), in place. -> TransferReport."""
    what = f"transfer {meta.get('model', 'encoder')} -> classifier"
    target_state = model.state_dict(keep_vars=True)
    _check_patch_embed(source, target_state["patch_embed.proj.weight"], what)
    prefix_rows, grid = _split_pos_embed(source, meta)
    rows = target_state["pos_embed"].shape[1]
    g_dst = math.isqrt(rows) if math.isqrt(rows) ** 2 == rows else math.isqrt(rows - 1)
    t_prefix = rows - g_dst * g_dst
    if t_prefix not in (0, prefix_rows.shape[1]):
        raise TransferError(f"{what}: target pos_embed has {rows} rows ({t_prefix} prefix), the export "
                            f"{prefix_rows.shape[1]} prefix rows")
    g_src = math.isqrt(grid.shape[1])
    pos = resize_pos_embed(grid, g_dst)
    if t_prefix:
        pos = torch.cat([prefix_rows.to(pos.dtype), pos], dim=1)
    how = f"{'cls row kept' if t_prefix else 'cls row dropped'}, {_resize_how(g_src, g_dst, 'bicubic')}"
    plan = {k: (k, None, None) for k in source if k.startswith(("patch_embed.", "blocks."))}
    plan["pos_embed"] = ("pos_embed", pos, how)
    ignored = []
    for key in ("cls_token", "norm.weight", "norm.bias"):  # absent in a global-pool / no-cls-token target
        if key in target_state:
            plan[key] = (key, None, None)
        else:
            ignored.append(key)
    fresh = [k for k in target_state if k.startswith(CLASSIFIER_FRESH_PREFIXES)]
    report = TransferReport()
    _account(source, target_state, plan, ignored, fresh, report, what)
    _check_shapes_and_copy(target_state, source, plan, report, what)
    return report
