"""The USP pretrain stage: masked latent modelling with the USP ViT on cached VAE latents."""
import logging

from ..artifacts import save_encoder
from ..models.usp_vit import build_model
from ..optim import decay_groups
from .base import Stage

log = logging.getLogger(__name__)

# model.* keys that are USPViTConfig fields (unset ones keep the registry's value)
MODEL_KEYS = ("mask_ratio", "decoder_dim", "decoder_depth", "decoder_heads", "mlp_act", "norm_pix")


class PretrainStage(Stage):
    name = "pretrain"

    def build_model(self, manifest):
        m = self.cfg.model
        options = {k: getattr(m, k) for k in MODEL_KEYS}
        model = build_model(m.name, in_chans=manifest["latent_channels"], input_size=manifest["latent_size"],
                            **options)
        n = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM parameters, %d patches (%d visible), mask ratio %g, norm-pix %s, %s MLPs", m.name,
                 n / 1e6, model.cfg.num_patches, model.num_keep, m.mask_ratio, m.norm_pix, m.mlp_act)
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
                           manifest["resolution"], step, epoch,
                           extra_meta={"latent_norm": manifest.get("latent_norm", {"mode": "none"})})
        log.info("exported encoder to %s", out)
        return {"export": str(out)}
