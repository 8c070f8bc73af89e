"""The generate stage: DiT/SiT training on the latent cache, from a USP encoder export or from scratch.

`usp-fast train --stage generate --config configs/generate/dit_b2.yaml` runs the shared loop
(usp_fast/engine.py: DeepSpeed, deterministic data stream with cached flips, checkpoints, exact resume, logging)
with this stage. The model comes from `model.name` (a registry name such as DiT-B/2 or SiT-XL/2, see
usp_fast/models/dit.py) and `generate.init`:
  random            DiT's own initialisation
  usp:<export dir>  usp_fast.transfer: the pretrained encoder's patch conv, blocks and LayerNorm affine, the resized
                    pos-emb; adaLN-Zero kept. The copied/ignored/initialised key sets go to <run>/transfer.json.
Objective (generate.objective): ddpm (DiT: epsilon + learned sigma, hybrid loss) or linear (SiT: velocity).
All randomness of a step (label dropout, timesteps, noise) comes from the engine's per-step generator, and the EMA
is checkpointed through state_dict, so a resumed run is bitwise the uninterrupted one (fp32).

EMA: each rank averages the fp32 master weights it holds (usp_fast.engine.MasterWeights: its partition of
DeepSpeed's fp32 masters under ZeRO 1-3 or bf16, not the bf16-rounded module weights; the parameters themselves
in fp32 at ZeRO-0), one foreach update after each optimizer step and no collective. Checkpoints hold the full EMA
(gathered at each save), so a run resumes on any number of ranks; the export gathers it once at the end.

At the end rank 0 writes <run>/generator/: model.safetensors, ema.safetensors, generator.json (everything
usp_fast/sampling.py needs to rebuild the model). <run>/generator.json is also written at start, so sampling works
from any intermediate checkpoint folder too.
"""
import json
import logging
from pathlib import Path

import torch

from .. import dist
from ..artifacts import GENERATOR_FORMAT, load_encoder, run_dir, save_generator
from ..config import GenerateConfig
from ..diffusion import create_objective, default_objective
from ..ema import EMA
from ..errors import ConfigError
from ..io import atomic_write_text
from ..models.dit import DiT, drop_labels, model_config
from ..optim import decay_groups
from ..transfer import check_same_latents, transfer_to_dit
from .base import Stage

log = logging.getLogger(__name__)


def parse_init(init):
    """'random' -> None; 'usp:<path>' -> Path."""
    if init == "random":
        return None
    if isinstance(init, str) and init.startswith("usp:") and len(init) > 4:
        return Path(init[4:])
    raise ConfigError(f"generate.init {init!r}: expected 'random' or 'usp:<encoder export directory>'")


class GenerateStage(Stage):
    name = "generate"
    config = GenerateConfig
    needs_labels = True

    def __init__(self, cfg):
        super().__init__(cfg)
        g = cfg.generate
        self.init_path = parse_init(g.init)
        self.objective, self.objective_name = None, None
        self.ema = self.masters = None
        self.ema_weights = None  # the gathered EMA, for the export
        self.null_class = None
        self.run_dir = run_dir(cfg.run)

    labels_hint = ", or set generate.unconditional=true to train without labels"

    def labels_required(self):
        return not self.cfg.generate.unconditional

    def check_inputs(self):
        super().check_inputs()
        if self.init_path is not None and not (self.init_path / "encoder.json").is_file():
            raise ConfigError(f"generate.init: {self.init_path} is not an encoder export folder (no encoder.json); "
                              "expected runs/<pretrain run>/export")

    # ---- model ----
    def model_spec(self, manifest, export_meta=None):
        """-> DiTConfig for this run, from the registry name, the cache and (with a USP init) the export."""
        g = self.cfg.generate
        overrides = {"in_channels": manifest["latent_channels"], "input_size": manifest["latent_size"],
                     "num_classes": manifest["num_classes"]}
        usp = export_meta is not None
        overrides["learn_sigma"] = g.learn_sigma
        overrides["norm_affine"] = usp if g.norm_affine is None else g.norm_affine
        overrides["mlp_act"] = g.mlp_act or "gelu_tanh"  # the official USP DiT keeps tanh-GELU after transfer
        overrides["class_dropout_prob"] = g.class_dropout_prob
        if g.unconditional:  # one embedding row, the null class, used for every sample
            overrides.update(num_classes=0, class_dropout_prob=1.0)
        return model_config(self.cfg.model.name, **overrides)

    def build_model(self, manifest, latent_norm):
        source = meta = None
        if self.init_path is not None:
            source, meta = load_encoder(self.init_path)
            check_same_latents(meta, manifest, latent_norm, self.init_path)
        spec = self.model_spec(manifest, meta)
        model = DiT(spec)
        objective = self.cfg.generate.objective
        self.objective_name = default_objective(spec.family) if objective == "auto" else objective
        self.objective = create_objective(self.objective_name, spec.learn_sigma)
        if self.objective_name == "ddpm" and not spec.learn_sigma:
            log.info("ddpm without learn_sigma: fixed (large) variance, loss = L_simple")
        self.null_class = spec.null_class
        report = None
        if source is not None:
            g = self.cfg.generate
            report = transfer_to_dit(model, source, meta, g.keep_blocks, copy_norms=g.transfer_norms,
                                     pos_interp=g.pos_interp)
            log.info("transfer %s -> %s:\n%s", self.init_path, self.cfg.model.name, report.summary())
        n = sum(p.numel() for p in model.parameters())
        log.info("model %s (%s, objective %s, init %s): %.2fM parameters, %d tokens, learn_sigma=%s, "
                 "norm_affine=%s, mlp_act=%s", self.cfg.model.name, spec.family, self.objective_name,
                 self.cfg.generate.init, n / 1e6, spec.grid_size**2, spec.learn_sigma, spec.norm_affine, spec.mlp_act)
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if report is not None:
                atomic_write_text(self.run_dir / "transfer.json", json.dumps(report.as_dict(), indent=1))
            atomic_write_text(self.run_dir / "generator.json",
                              json.dumps(self.generator_meta(model, manifest, latent_norm), indent=1))
        return model

    def generator_meta(self, model, manifest, latent_norm, step=None, epoch=None):
        return {"format": GENERATOR_FORMAT, "model": self.cfg.model.name, "config": model.config_dict(),
                "objective": self.objective_name, "init": self.cfg.generate.init,
                "latent_channels": manifest["latent_channels"], "latent_size": manifest["latent_size"],
                "num_classes": manifest["num_classes"], "class_names": manifest.get("class_names"),
                "resolution": manifest["resolution"], "vae": manifest["vae"], "ema_decay": self.cfg.ema.decay,
                "latent_norm": latent_norm.as_dict(),
                "step": step, "epoch": epoch}

    def param_groups(self, model):
        return decay_groups(model, self.cfg.optim.weight_decay)

    # ---- training ----
    def loss(self, model, batch, generator):
        if self.cfg.generate.unconditional:
            labels = torch.full_like(batch["labels"], self.null_class)
        else:
            labels = drop_labels(batch["labels"], self.cfg.generate.class_dropout_prob, self.null_class, generator)
        return self.objective.training_loss(model, batch["latents"], labels, generator)

    def attach(self, engine):
        from ..engine import MasterWeights

        self.masters = MasterWeights(engine)
        self.ema = EMA(self.masters.tensors(), self.cfg.ema.decay, warmup=self.cfg.ema.warmup)

    def after_step(self, model, step):
        self.ema.update(self.masters.tensors(), step)  # this rank's fp32 masters: no collective

    def state_dict(self):
        return {"ema": self.masters.gather(self.ema.shadow)}

    def load_state_dict(self, state):
        if "ema" not in state:
            raise KeyError("checkpoint has no EMA state: was it written by --stage generate?")
        self.ema.shadow = self.masters.scatter(state["ema"])

    def collect(self):
        self.ema_weights = self.masters.gather(self.ema.shadow)

    def finish(self, model, run_dir, manifest, latent_norm, step, epoch):
        weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        ema = {**weights, **self.ema_weights}
        meta = self.generator_meta(model, manifest, latent_norm, step, epoch)
        meta.pop("format")
        out = save_generator(Path(run_dir) / "generator", weights, ema, meta)
        log.info("saved generator weights (model + EMA) to %s", out)
        return {"generator": str(out)}
