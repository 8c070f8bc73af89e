"""The USP pretrain stage: masked latent modelling with the USP ViT on cached VAE latents."""
import logging

from ..artifacts import save_encoder
from ..config import PretrainConfig
from ..models.usp_vit import build_model_from_config, kept_patches
from ..optim import decay_groups
from .base import Stage

log = logging.getLogger(__name__)

class PretrainStage(Stage):
    name = "pretrain"
    config = PretrainConfig

    def build_model(self, manifest, latent_norm):
        m = self.cfg.model
        model = build_model_from_config(m, manifest["latent_channels"], manifest["latent_size"])
        n = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM parameters, %d patches (%d visible), mask ratio %g, norm-pix %s, %s MLPs", m.name,
                 n / 1e6, model.cfg.num_patches, kept_patches(model.cfg.num_patches, m.mask_ratio), m.mask_ratio,
                 m.norm_pix, m.mlp_act)
        return model

    def param_groups(self, model):
        return decay_groups(model, self.cfg.optim.weight_decay)

    def loss(self, model, batch, generator):
        latents = batch["latents"]
        # the mask is drawn here, outside the (possibly compiled) forward; the same draws as inside it
        net = getattr(model, "module", model)  # the DeepSpeed engine's module, or a bare model (benchmarks)
        masking = net.random_masking(latents.shape[0], latents.device, generator)
        loss, _, _ = model(latents, masking=masking)
        return loss, {}

    def finish(self, model, run_dir, manifest, latent_norm, step, epoch):
        if not self.cfg.train.export:
            return {}
        out = save_encoder(model, run_dir / "export", self.cfg.model.name, manifest["vae"],
                           manifest["resolution"], step, epoch,
                           extra_meta={"latent_norm": latent_norm.as_dict()})
        log.info("exported encoder to %s", out)
        return {"export": str(out)}
