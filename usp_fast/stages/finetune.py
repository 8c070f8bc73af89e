"""`--stage finetune`: full fine-tuning of a pretrained USP encoder as an image classifier on VAE latents.

Recipe (MAE's fine-tuning, with the issue's layer-wise lr decay 0.75): the encoder export copied into timm's
`VisionTransformer` built on latents (2x2 patch conv over the latent channels, img_size = latent size, global
average pool + fc_norm, drop path 0.1) by `transfer_to_classifier`; AdamW with layer-wise lr decay (timm's
`param_groups_layer_decay`: its groups carry `lr_scale`, which the engine multiplies into the scheduled lr);
RandAugment in image space before the VAE encode (`data.randaug`, online path); Mixup 0.8 / CutMix 1.0 on the
latents with label smoothing 0.1 and soft-target cross-entropy; linear warm-up then half-cosine (the engine's
schedule). Mixup (NumPy's global RNG) and drop path (torch's global RNG) are seeded for each micro-batch from the
engine's per-step generator seed, so a resumed run draws the same mixes and dropped paths.

At the end the classifier is saved as safetensors (runs/<name>/classifier/) and, when `finetune.val_cache_dir`
names a latent cache of held-out images (same VAE and resolution), its top-1 / top-5 are reported (posterior
mean, centre crop, no flip) in runs/<name>/finetune.json.
"""
import json
import logging

import numpy as np
import torch
from torch import nn

from ..config import FinetuneConfig
from ..io import atomic_path, atomic_write_text
from ..metrics.classification import top_k_accuracy
from ..models.classifier import build_classifier
from ..optim import layer_decay_groups
from ..errors import ConfigError
from .base import Stage

log = logging.getLogger(__name__)


@torch.no_grad()
def top_k(model, latents, labels, batch=256, ks=(1, 5)):
    """-> {'top1': %, 'top5': %} of `model` on latents [N, C, H, W] (any device/dtype the model accepts)."""
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    acc = top_k_accuracy(lambda x: model(x.to(p.device, p.dtype)), latents, labels, ks, batch)
    model.train(was_training)
    return {k: v for k, v in acc.items() if k != "correct"}


def load_cache_latents(cache_dir, cfg):
    """All posterior means (view 0, no flip) and labels of a finished latent cache."""
    from ..data.cache import open_cache

    cache, _ = open_cache(cache_dir, cfg)
    idx = np.arange(len(cache))
    mean, _, labels = cache.read(idx, np.zeros(len(idx), dtype=np.int64))
    return torch.from_numpy(np.asarray(mean, dtype=np.float32)), torch.from_numpy(labels)


class FinetuneStage(Stage):
    name = "finetune"
    config = FinetuneConfig
    needs_labels = True

    def __init__(self, cfg):
        super().__init__(cfg)
        f = cfg.finetune
        if not f.encoder:
            raise ConfigError("finetune.encoder: set it to an encoder export folder (runs/<pretrain>/export)")
        self.mixup = None
        self.num_classes = None

    def check_inputs(self):
        from ..data.prepare import check_labelled_cache

        super().check_inputs()
        check_labelled_cache(self.cfg.finetune.val_cache_dir, "finetune.val_cache_dir")

    def latent_norm(self, manifest):
        """Online images have no cache statistics: then the normalisation the encoder was pretrained in (its export
        records it) is the one to fine-tune in, when it is the vae.normalize mode asked for."""
        from ..artifacts import load_encoder
        from ..vae import LatentNorm

        mode = self.cfg.vae.normalize
        if mode != "none" and manifest.get("latent_mean") is None:
            recorded = LatentNorm.of(load_encoder(self.cfg.finetune.encoder)[1])
            if recorded.mode == mode:
                return recorded
        return super().latent_norm(manifest)

    def build_model(self, manifest, latent_norm):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        from ..artifacts import load_encoder
        from ..transfer import transfer_to_classifier

        f = self.cfg.finetune
        source, meta = load_encoder(f.encoder)
        if meta.get("vae") not in (None, manifest["vae"]):
            log.warning("the encoder was pretrained on latents of %s, fine-tuning reads %s", meta["vae"],
                        manifest["vae"])
        self.num_classes = manifest["num_classes"]
        model = build_classifier(meta, self.num_classes, manifest["latent_size"], f.drop_path)
        report = transfer_to_classifier(model, source, meta)
        log.info("classifier from %s (%d classes):\n%s", f.encoder, self.num_classes, report.summary())
        if f.mixup > 0 or f.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, label_smoothing=f.label_smoothing,
                               num_classes=self.num_classes)
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=f.label_smoothing)
        return model

    def param_groups(self, model):
        return layer_decay_groups(model, self.cfg.optim.weight_decay, self.cfg.finetune.layer_decay)

    def loss(self, model, batch, generator):
        x, y = batch["latents"], batch["labels"]
        # timm's drop path draws from torch's global RNG: reseed it per micro-step (exact resume), no device sync
        torch.manual_seed(generator.initial_seed())
        if self.mixup is not None:
            x, y = self._mix(x, y, generator)
        logits = model(x)
        loss = self.criterion(logits.float(), y)
        return loss, {}

    def _mix(self, x, y, generator):
        """timm's Mixup with NumPy's global RNG seeded from the engine's per-micro-step seed (no device sync)."""
        from ..seeding import seeded_global_rngs

        with seeded_global_rngs(generator.initial_seed()):  # shared with the RandAugment threads
            return self.mixup(x, y)

    def finish(self, model, run_dir, manifest, latent_norm, step, epoch):
        from safetensors.torch import save_file

        out = run_dir / "classifier"
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "model.safetensors") as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        meta = {"encoder": self.cfg.finetune.encoder, "num_classes": self.num_classes,
                "class_names": manifest.get("class_names"), "latent_size": manifest["latent_size"],
                "vae": manifest["vae"], "latent_norm": latent_norm.as_dict(), "step": step, "epoch": epoch}
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
        result = {"classifier": str(out / "model.safetensors")}
        f = self.cfg.finetune
        if f.val_cache_dir:
            latents, labels = load_cache_latents(f.val_cache_dir, self.cfg)
            latents = latent_norm.normalize(latents)  # as trained
            acc = top_k(model, latents, labels, f.eval_batch, ks=(1, min(5, self.num_classes)))
            log.info("held-out %s: %s (%d images)", f.val_cache_dir, acc, len(labels))
            atomic_write_text(run_dir / "finetune.json", json.dumps({"val_cache_dir": f.val_cache_dir, **acc,
                                                                     "num_images": len(labels), "step": step}, indent=1))
            result.update(acc)
        return result
