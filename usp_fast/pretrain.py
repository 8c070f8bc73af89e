"""The USP pretrain stage: masked latent modelling with the USP ViT on cached VAE latents."""
import logging

from .export import save_encoder
from .models.usp_vit import build_model
from .task import Task

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def decay_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices only, not on biases, norms, tokens or position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PretrainTask(Task):
    stage = "pretrain"

    def build_model(self, manifest):
        m = self.cfg.model
        overrides = dict(m.overrides or {})
        overrides.setdefault("in_chans", manifest["latent_channels"])
        overrides.setdefault("input_size", manifest["latent_size"])
        for key in ("in_chans", "input_size"):
            want = manifest["latent_channels" if key == "in_chans" else "latent_size"]
            if overrides[key] != want:
                raise ValueError(f"model.overrides.{key}={overrides[key]} but the latent cache has {want}")
        model = build_model(m.name, **overrides)
        n = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM parameters, %d patches (%d visible)", m.name, n / 1e6, model.cfg.num_patches,
                 model.num_keep)
        return model

    def param_groups(self, model):
        return decay_groups(model, self.cfg.optim.weight_decay)

    def loss(self, model, batch, generator):
        loss, _, _ = model(batch["latents"], generator=generator)
        return loss, {}

    def finish(self, model, run_dir, manifest, step, epoch):
        if not self.cfg.train.export:
            return {}
        out = save_encoder(model, run_dir / "export", self.cfg.model.name, manifest["vae"],
                           manifest["resolution"], step, epoch)
        log.info("exported encoder to %s", out)
        return {"export": str(out)}
