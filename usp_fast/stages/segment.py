"""`--stage segment`: semantic segmentation from a USP encoder export (or a random-init encoder, the baseline) under
UperNet, on VAE latents of the images as the encoder was pretrained, scored by single-scale mIoU.

Recipe (MAE/BEiT on ADE20K, configs/segment/ade20k_vit_{b,l}.yaml): the encoder's token maps of four blocks ->
BEiT's neck -> UPerNet + auxiliary FCN head (usp_fast.models.segmenter); cross-entropy on logits upsampled to the
crop, ignored pixels left out, auxiliary loss x 0.4; AdamW with layer-wise lr decay (timm's groups, BEiT's layer
ids); linear warm-up then poly decay (optim.schedule=poly). Training views: usp_fast.data.segmentation (paired
random resize, crop, flip; masks only ever nearest), encoded online each step (segment.views=0) or read from a
cache of fixed views. Drop path and dropout draw from torch's global RNG, reseeded per micro-step from the
engine's generator, so a resumed run is the uninterrupted one.

At the end rank 0 writes <run>/segmenter/ (model.safetensors + meta.json), scores the validation split by
sliding-window inference over each whole image (resized to segment.img_scale, windows of data.resolution every
segment.eval_stride pixels, logits resized bilinearly to the original mask), and writes <run>/segment.json
(mIoU, per-class IoU and accuracy, aAcc, mAcc) and <run>/segment_val.png (image | ground truth | prediction).
"""
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist
from ..config import SegmentConfig
from ..errors import ConfigError
from ..io import atomic_write_text
from .base import Stage, check_batches

log = logging.getLogger(__name__)

IGNORE = 255


def parse_init(init):
    """'random' -> None; 'usp:<path>' -> Path."""
    if init == "random":
        return None
    if isinstance(init, str) and init.startswith("usp:") and len(init) > 4:
        return Path(init[4:])
    raise ConfigError(f"segment.init {init!r}: expected 'random' or 'usp:<encoder export directory>'")


def view_cache_dir(cfg, vae_name):
    s = cfg.segment
    if s.cache_dir:
        return Path(s.cache_dir)
    root = Path(cfg.data.root)
    tag = Path(str(vae_name)).name.replace("/", "_").replace(":", "")
    return root.parent / f"{root.name}_views{s.views}_{cfg.data.resolution}_{tag}"


def masked_ce(logits, masks):
    """Cross-entropy of logits upsampled (bilinear) to the mask size, averaged over the pixels not ignored (a
    micro-batch with none gives 0, not NaN; no host sync)."""
    up = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(up, masks, ignore_index=IGNORE, reduction="sum")
    return total / (masks != IGNORE).sum().clamp(min=1)


class SegmentStage(Stage):
    name = "segment"
    config = SegmentConfig
    needs_labels = True  # the batches' 'labels' are the masks [B, S, S]

    def __init__(self, cfg):
        super().__init__(cfg)
        self.init_path = parse_init(cfg.segment.init)
        self.vae = self.names = None

    def check_inputs(self):
        from ..data.segmentation import class_names, list_pairs

        cfg, s = self.cfg, self.cfg.segment
        check_batches(cfg.train)
        if cfg.train.micro_batch < 2:  # the neck's and heads' BatchNorm cannot train on one sample
            raise ConfigError("train.micro_batch must be at least 2 for --stage segment (BatchNorm in the neck and "
                              "heads)")
        if cfg.data.root is None:
            raise ConfigError("data.root: set it to a folder in the ADE20K layout (images/{training,validation}, "
                              "annotations/{training,validation})")
        if self.init_path is not None and not (self.init_path / "encoder.json").is_file():
            raise ConfigError(f"segment.init: {self.init_path} is not an encoder export folder (no encoder.json); "
                              "expected runs/<pretrain run>/export")
        if s.demo_images:
            return  # built by run()
        list_pairs(cfg.data.root, "training")
        list_pairs(cfg.data.root, "validation")
        class_names(cfg.data.root, s.num_classes)

    def run(self, resume=None, overwrite=False, allow_config_change=False):
        from ..data.mosaic import make_mosaic_set
        from ..engine import Trainer

        s = self.cfg.segment
        if s.demo_images:
            if dist.is_main():
                make_mosaic_set(self.cfg.data.root, s.demo_photos or None, num_train=s.demo_images,
                                num_val=max(1, s.demo_images // 4))
            dist.barrier()
        return Trainer(self.cfg, self, resume, overwrite, allow_config_change).train()

    # ---- data ----
    def data_source(self, device):
        from ..data.segmentation import (SegOnlineSource, build_view_cache, class_names, list_pairs,
                                         open_view_cache)
        from ..vae import load_vae

        cfg, s = self.cfg, self.cfg.segment
        self.vae = load_vae(cfg.vae.name, cfg.vae.scale, device=device)
        if cfg.data.resolution % self.vae.downsample:
            raise ConfigError(f"data.resolution {cfg.data.resolution} (the crop) is not a multiple of the VAE's "
                              f"downsampling {self.vae.downsample}")
        pairs, self.names = list_pairs(cfg.data.root, "training"), class_names(cfg.data.root, s.num_classes)
        if s.views == 0:
            source = SegOnlineSource(cfg, self.vae, device, pairs, self.names)
            return source, source.manifest
        folder = view_cache_dir(cfg, cfg.vae.name)
        if dist.is_main() and open_view_cache(cfg, self.vae, device, pairs, self.names, folder)[0] is None:
            build_view_cache(cfg, self.vae, device, pairs, self.names, folder)
        dist.barrier()
        return open_view_cache(cfg, self.vae, device, pairs, self.names, folder)

    def latent_norm(self, manifest):
        """The normalisation the encoder was pretrained in (its export records it), when it is the vae.normalize
        mode asked for; otherwise the data's statistics (a view cache's; online images have none)."""
        from ..artifacts import load_encoder
        from ..vae import LatentNorm

        if self.init_path is not None and self.cfg.vae.normalize != "none":
            recorded = LatentNorm.of(load_encoder(self.init_path)[1])
            if recorded.mode == self.cfg.vae.normalize:
                return recorded
        return super().latent_norm(manifest)

    # ---- model ----
    def build_model(self, manifest, latent_norm):
        from ..artifacts import load_encoder
        from ..models.layers import sincos_pos_embed_2d
        from ..models.segmenter import Segmenter, segmenter_config
        from ..models.usp_vit import MODELS
        from ..transfer import check_same_latents, transfer_to_classifier

        s = self.cfg.segment
        source = meta = None
        if self.init_path is not None:
            source, meta = load_encoder(self.init_path)
            check_same_latents(meta, manifest, latent_norm, self.init_path)
            encoder = meta["config"]
        else:
            encoder = {**MODELS[self.cfg.model.name], "in_chans": manifest["latent_channels"]}
        spec = segmenter_config(encoder, manifest["num_classes"], manifest["latent_size"], manifest["downsample"],
                                s.out_indices, s.head_channels, s.aux_channels, s.dropout)
        if spec.latent_size % spec.patch_size:
            raise ConfigError(f"data.resolution {self.cfg.data.resolution}: {spec.latent_size} latents are not a "
                              f"multiple of the patch size {spec.patch_size}")
        model = Segmenter(spec, drop_path=s.drop_path)
        vit = model.backbone
        if source is None:  # the baseline starts from USP's fixed 2-D sin-cos table too: only the weights differ
            with torch.no_grad():
                vit.pos_embed.copy_(sincos_pos_embed_2d(spec.embed_dim, spec.latent_size // spec.patch_size, 1)[None])
            log.info("segmenter: random-init %s encoder, out_indices %s", self.cfg.model.name, spec.out_indices)
        else:
            last = max(spec.out_indices)  # blocks past the last tapped one are not part of the segmenter
            used = {k: v for k, v in source.items() if not (k.startswith("blocks.") and int(k.split(".")[1]) > last)}
            report = transfer_to_classifier(vit, used, meta)
            log.info("segmenter from %s, out_indices %s:\n%s", self.init_path, spec.out_indices, report.summary())
        return model

    def param_groups(self, model):
        from ..optim import layer_decay_groups

        return layer_decay_groups(model, self.cfg.optim.weight_decay, self.cfg.segment.layer_decay)

    def loss(self, model, batch, generator):
        # drop path and dropout draw from torch's global RNG: reseed it per micro-step (exact resume), no sync
        torch.manual_seed(generator.initial_seed())
        masks = batch["labels"]
        main, aux = model(batch["latents"])
        loss_main, loss_aux = masked_ce(main, masks), masked_ce(aux, masks)
        return loss_main + self.cfg.segment.aux_weight * loss_aux, {"loss_main": loss_main.detach(),
                                                                     "loss_aux": loss_aux.detach()}

    # ---- the end ----
    def finish(self, model, run_dir, manifest, latent_norm, step, epoch):
        out = run_dir / "segmenter"
        model.save_folder(out, {"init": self.cfg.segment.init, "class_names": self.names, "vae": manifest["vae"],
                                "latent_norm": latent_norm.as_dict(), "resolution": self.cfg.data.resolution,
                                "step": step, "epoch": epoch})
        from ..models.segmenter import Segmenter

        # score the export itself, in fp32 (a bf16 run's module keeps bf16 buffers such as BatchNorm's statistics)
        exported = Segmenter.from_folder(out)[0].to(next(model.parameters()).device)
        scores = evaluate(exported, self.vae, latent_norm, self.cfg, self.names, run_dir, step)
        return {"segmenter": str(out / "model.safetensors"), "segment_json": str(run_dir / "segment.json"),
                "mIoU": scores["mIoU"], "aAcc": scores["aAcc"]}


@torch.no_grad()
def evaluate(model, vae, latent_norm, cfg, names, run_dir, step=None):
    """Single-scale sliding-window scores of `model` on the validation split -> <run>/segment.json and
    <run>/segment_val.png; -> the scores."""
    from ..data.segmentation import eval_pair, list_pairs
    from ..metrics.segmentation import SegmentationScore
    from ..models.segmenter import slide_logits
    from ..pictures import label_palette, save_png, segmentation_panel

    s, mc = cfg.segment, model.cfg
    pairs = list_pairs(cfg.data.root, "validation")
    pairs = pairs[:s.eval_images] if s.eval_images else pairs
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    crop, stride = cfg.data.resolution // mc.downsample, max(1, s.eval_stride // mc.downsample)
    score, pictures = SegmentationScore(len(names), IGNORE, p.device), []
    for pair in pairs:
        x, (h, w), image, mask = eval_pair(pair, len(names), s.img_scale, mc.token_stride, cfg.data.max_pixels)
        mean, _ = vae.encode(x.to(p.device))
        z = latent_norm.normalize(mean.float()).to(p.dtype)
        logits = slide_logits(model, z, crop, stride)[..., :h, :w]
        logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0]
        score.update(pred, torch.from_numpy(mask.astype(np.int64)).to(p.device))
        if len(pictures) < s.pictures:
            pictures.append((image, mask, pred.cpu().numpy().astype(np.uint8)))
    model.train(was_training)
    result = score.compute(names)
    result.update({"images": len(pairs), "split": "validation", "step": step, "init": s.init,
                   "inference": {"mode": "slide", "crop_px": cfg.data.resolution, "stride_px": stride * mc.downsample,
                                 "img_scale": list(s.img_scale), "single_scale": True, "flip": False}})
    atomic_write_text(run_dir / "segment.json", json.dumps(result, indent=1))
    if pictures:
        save_png(segmentation_panel(pictures, label_palette(len(names), IGNORE)), run_dir / "segment_val.png")
    log.info("validation (%d images): mIoU %.2f, aAcc %.2f, mAcc %.2f", len(pairs), result["mIoU"] or float("nan"),
             result["aAcc"] or float("nan"), result["mAcc"] or float("nan"))
    return result
