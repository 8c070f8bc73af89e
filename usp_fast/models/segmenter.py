"""The segmentation model of --stage segment: a ViT on VAE latents (timm's VisionTransformer, the encoder export's
shape), MAE/BEiT's multi-level neck, segmentation_models_pytorch's UPerNet decoder and an auxiliary FCN head.

Geometry: the ViT sees latents (the image / `downsample`, 8 for SD-VAE and TAEF2) in patch x patch tokens, so one
token covers t = patch x downsample pixels (16: a 512 px crop is 64x64 latents, 32x32 tokens). The token maps of
four blocks (`out_indices`, 0-based: ViT-B 3,5,7,11; ViT-L 7,11,15,23) become a pyramid at strides t/4, t/2, t, 2t
(4, 8, 16, 32 px) through the BEiT/MAE neck: two 2x2 transposed convolutions (with BatchNorm + GELU between),
one, none (identity) and a 2x2 max-pool. UPerNet (pyramid pooling on the coarsest level, FPN top-down, fusion at
stride t/4) is smp's `UPerNetDecoder`, followed by dropout 0.1 and a 1x1 classifier; the auxiliary FCN head (one
3x3 conv + BN + ReLU, dropout, 1x1; mmseg's FCNHead as in upernet_mae/beit) reads the stride-t level. Logits are
upsampled bilinearly (align_corners=False) to the image size for the loss and the metrics; masks are never
resized here.

smp's decoder differs from mmseg's UPerHead in one respect: it LayerNorms each pyramid level first (mmseg has no
norm there); kept, as the ViT's token maps are not normalised. BEiT's relative position bias and layer-scale are not
part of a USP encoder and are not added.
"""
import json
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..artifacts import ExportError
from ..io import atomic_path, atomic_write_text

SEGMENTER_FORMAT = "usp-fast-segmenter/1"


def default_out_indices(depth):
    """BEiT/MAE's four blocks, scaled with depth: 12 -> 3,5,7,11; 24 -> 7,11,15,23; 28 -> 8,13,18,27; 6 -> 1,2,3,5."""
    return [round(depth / 3) - 1, depth // 2 - 1, round(2 * depth / 3) - 1, depth - 1]


@dataclass
class SegmenterConfig:
    embed_dim: int
    depth: int
    num_heads: int
    num_classes: int
    latent_size: int          # training crop in latents (the position table's grid is latent_size / patch_size)
    downsample: int = 8       # image pixels per latent pixel (the VAE's)
    patch_size: int = 2
    in_chans: int = 4
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    out_indices: list = field(default_factory=list)
    head_channels: int = 768  # UPerNet width (mmseg upernet_mae: 768 for ViT-B)
    aux_channels: int = 256   # FCN head width (mmseg: 256)
    dropout: float = 0.1      # before each classifier (mmseg: 0.1)

    def __post_init__(self):
        self.out_indices = list(self.out_indices) or default_out_indices(self.depth)
        if len(self.out_indices) != 4 or not all(0 <= i < self.depth for i in self.out_indices) \
                or sorted(self.out_indices) != self.out_indices:
            raise ValueError(f"out_indices {self.out_indices}: expected four non-decreasing block indices in "
                             f"0..{self.depth - 1}")

    @property
    def token_stride(self):
        return self.patch_size * self.downsample


def conv_bn_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class ViTNeck(nn.Module):
    """Four token maps [B, D, g, g] -> pyramid at 4x, 2x, 1x and 1/2x of the token resolution (BEiT/MAE)."""

    def __init__(self, dim):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)

    def forward(self, maps):
        return [f(x) for f, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


class FCNHead(nn.Module):
    def __init__(self, cin, channels, num_classes, dropout):
        super().__init__()
        self.conv = conv_bn_relu(cin, channels, 3)
        self.cls = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x):
        return self.cls(self.conv(x))


class Segmenter(nn.Module):
    """latents [B, C, h, w] (h, w multiples of patch_size; any size: the position table is resized) -> logits."""

    def __init__(self, cfg: SegmenterConfig, drop_path=0.0):
        super().__init__()
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        self.cfg = cfg
        D = cfg.embed_dim
        self.backbone = VisionTransformer(
            img_size=cfg.latent_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
            global_pool="token", embed_dim=D, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            drop_path_rate=drop_path, norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps), dynamic_img_size=True)
        # blocks past the last tapped one, the final norm and the head are never used: drop them (no dead params)
        self.backbone.prune_intermediate_layers(cfg.out_indices, prune_norm=True, prune_head=True)
        self.neck = ViTNeck(D)
        # smp numbers features from stride 1; it reads levels [2:] (strides 4..32): the first two are placeholders
        self.decode_head = UPerNetDecoder([0, 0, D, D, D, D], encoder_depth=5, decoder_channels=cfg.head_channels)
        self.classifier = nn.Sequential(nn.Dropout2d(cfg.dropout), nn.Conv2d(cfg.head_channels, cfg.num_classes, 1))
        self.aux_head = FCNHead(D, cfg.aux_channels, cfg.num_classes, cfg.dropout)

    # ---- parameter groups (usp_fast.optim.layer_decay_groups: timm's layer-wise decay reads these) ----
    def group_matcher(self, coarse=False):
        """BEiT's layer ids: patch conv, cls token and pos-emb 0, block i i + 1; neck and heads the top (lr x 1)."""
        return {"stem": r"^backbone\.(?:cls_token|pos_embed|patch_embed)", "blocks": r"^backbone\.blocks\.(\d+)"}

    def no_weight_decay(self):
        return {"backbone.pos_embed", "backbone.cls_token"}

    def set_grad_checkpointing(self, enable=True):
        """train.activation_checkpointing: timm's, on the encoder blocks (the heads are small)."""
        self.backbone.set_grad_checkpointing(enable)

    # ---- forward ----
    def pyramid(self, latents):
        taps = sorted(set(self.cfg.out_indices))  # a tiny encoder (depth < 4) may tap one block twice
        maps = self.backbone.forward_intermediates(latents, indices=taps, norm=False, output_fmt="NCHW",
                                                   intermediates_only=True)
        by_block = dict(zip(taps, maps))
        return self.neck([by_block[i] for i in self.cfg.out_indices])

    def forward(self, latents):
        """-> (main logits at stride t/4, auxiliary logits at stride t), both in image pixels' grid units."""
        levels = self.pyramid(latents)
        main = self.classifier(self.decode_head([None, None, *levels]))
        return main, self.aux_head(levels[2])

    def logits(self, latents):
        """Main logits upsampled (bilinear) to the image size: latents x downsample."""
        main = self.classifier(self.decode_head([None, None, *self.pyramid(latents)]))
        size = (latents.shape[-2] * self.cfg.downsample, latents.shape[-1] * self.cfg.downsample)
        return F.interpolate(main, size=size, mode="bilinear", align_corners=False)

    # ---- export ----
    def save_folder(self, folder, meta):
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        m = {**meta, "format": SEGMENTER_FORMAT, "config": asdict(self.cfg)}
        atomic_write_text(folder / "meta.json", json.dumps(m, indent=1))
        return m

    @classmethod
    def from_folder(cls, folder):
        """A segmenter export (runs/<name>/segmenter) -> (Segmenter, fp32, eval; meta)."""
        st, js = folder / "model.safetensors", folder / "meta.json"
        for f in (st, js):
            if not f.is_file():
                raise ExportError(f"{f} is missing: expected a segmenter folder from --stage segment")
        meta = json.loads(js.read_text())
        if meta.get("format") != SEGMENTER_FORMAT:
            raise ExportError(f"{js}: format {meta.get('format')!r}, expected {SEGMENTER_FORMAT!r}")
        model = cls(SegmenterConfig(**meta["config"]))
        model.load_state_dict(load_file(str(st)))
        return model.eval(), meta


def segmenter_config(encoder_config, num_classes, latent_size, downsample, out_indices=(), head_channels=None,
                     aux_channels=256, dropout=0.1):
    """The SegmenterConfig of an encoder (an export's meta['config'] or a usp_vit registry entry's fields)."""
    c = encoder_config
    return SegmenterConfig(embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                           num_classes=num_classes, latent_size=latent_size, downsample=downsample,
                           patch_size=c.get("patch_size", 2), in_chans=c["in_chans"],
                           mlp_ratio=c.get("mlp_ratio", 4.0), norm_eps=c.get("norm_eps", 1e-6),
                           out_indices=list(out_indices), head_channels=head_channels or c["embed_dim"],
                           aux_channels=aux_channels, dropout=dropout)


def window_starts(size, crop, stride):
    """mmseg's slide windows along one axis: starts such that every window is `crop` long (or the whole axis)."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})


@torch.no_grad()
def slide_logits(model, latents, crop, stride):
    """Sliding-window inference (mmseg's 'slide' mode) in latent units: windows of crop x crop latents every
    `stride`, each window's logits (at image resolution) added into the full canvas and averaged where windows
    overlap. A window that covers the image is whole-image inference. -> [B, classes, H*d, W*d]."""
    B, _, H, W = latents.shape
    d, n = model.cfg.downsample, model.cfg.num_classes
    out = latents.new_zeros((B, n, H * d, W * d), dtype=torch.float32)
    count = latents.new_zeros((1, 1, H * d, W * d), dtype=torch.float32)
    for y in window_starts(H, crop, stride):
        for x in window_starts(W, crop, stride):
            y2, x2 = min(y + crop, H), min(x + crop, W)
            out[..., y * d:y2 * d, x * d:x2 * d] += model.logits(latents[..., y:y2, x:x2]).float()
            count[..., y * d:y2 * d, x * d:x2 * d] += 1
    return out / count

