"""The generate stage: DiT/SiT training on the latent cache, from a USP encoder export or from scratch.

`python usp_fast/train.py --stage generate --config configs/generate/dit_b2.yaml` runs the shared loop
(usp_fast/engine.py: DeepSpeed, deterministic data stream with cached flips, checkpoints, exact resume, logging)
with this Task. The model comes from `model.name` (a registry name such as DiT-B/2 or SiT-XL/2, see
usp_fast/models/dit.py) and `generate.init`:
  random            DiT's own initialisation
  usp:<export dir>  usp_fast.transfer: the pretrained encoder's patch conv, blocks and LayerNorm affine, the resized
                    pos-emb; adaLN-Zero kept. The copied/ignored/initialised key sets go to <run>/transfer.json.
Objective (generate.objective): ddpm (DiT: epsilon + learned sigma, hybrid loss) or linear (SiT: velocity).
All randomness of a step (label dropout, timesteps, noise) comes from the engine's per-step generator, and the EMA
is checkpointed through state_dict, so a resumed run is bitwise the uninterrupted one (fp32).

EMA: an fp32 copy of every parameter on each rank, updated after each optimizer step with foreach ops from the
module's parameters (with bf16 training those are DeepSpeed's bf16 weights, not its fp32 master partition).
Supported with ZeRO 0-2, where every rank holds the full module parameters; ZeRO-3 partitions them and is refused.

At the end rank 0 writes <run>/generator/: model.safetensors, ema.safetensors, generator.json (everything
usp_fast/sample.py needs to rebuild the model). <run>/generator.json is also written at start, so sampling works
from any intermediate checkpoint folder too.
"""
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import dist
from .config import Opt
from .diffusion import create_objective, default_objective
from .export import load_encoder
from .io import atomic_path, atomic_write_text
from .models.dit import DiT, drop_labels, model_config
from .pretrain import decay_groups
from .task import Task
from .transfer import transfer_to_dit

log = logging.getLogger(__name__)

GENERATOR_FORMAT = "usp-fast-generator/1"
GENERATE_KEYS = ("learn_sigma", "norm_affine", "mlp_act", "class_dropout_prob")


class EMA:
    """fp32 exponential moving average of a module's parameters: shadow <- decay * shadow + (1 - decay) * param."""

    def __init__(self, model, decay):
        self.decay = float(decay)
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model):
        params = [p.detach() for _, p in model.named_parameters()]
        if self.shadow[0].device != params[0].device:  # first update after the engine moved the model
            self.shadow = [s.to(params[0].device) for s in self.shadow]
        if params[0].dtype == torch.float32:
            torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)
        else:  # bf16 weights: lerp needs equal dtypes; mul + add promote into the fp32 shadow
            torch._foreach_mul_(self.shadow, self.decay)
            torch._foreach_add_(self.shadow, params, alpha=1.0 - self.decay)

    def state_dict(self):
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state):
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.shadow = [state[n].detach().float().clone().to(s.device) for n, s in zip(self.names, self.shadow)]


def parse_init(init):
    """'random' -> None; 'usp:<path>' -> Path."""
    if init == "random":
        return None
    if isinstance(init, str) and init.startswith("usp:") and len(init) > 4:
        return Path(init[4:])
    raise ValueError(f"generate.init {init!r}: expected 'random' or 'usp:<encoder export directory>'")


def _check_vae(export_meta, manifest, export_path):
    src, dst = export_meta.get("vae"), manifest.get("vae") or {}
    if not src:
        log.warning("encoder export %s records no VAE identity; cannot check it matches the cache's", export_path)
        return
    for key in ("fingerprint", "scale", "latent_channels"):
        if key in src and key in dst and src[key] != dst[key]:
            raise ValueError(f"the encoder at {export_path} was pretrained on latents of VAE {src.get('name')!r} "
                             f"({key} {src[key]!r}), but the latent cache was made with {dst.get('name')!r} "
                             f"({key} {dst[key]!r}): generation must use the same latent space")


class GenerateTask(Task):
    stage = "generate"
    needs_labels = True
    schema = {
        "generate": {
            "init": "random",            # 'random' or 'usp:<encoder export dir>' (from --stage pretrain)
            "keep_blocks": Opt(int),     # USP init: copy only the first N blocks, re-init the rest (Table 8g)
            "objective": "auto",         # auto (DiT: ddpm, SiT: linear), ddpm or linear
            "learn_sigma": Opt(bool),    # unset: True for DiT (2C outputs), False for SiT
            "norm_affine": Opt(bool),    # unset: True with a USP init (the ViT's LN affine), False (DiT's) otherwise
            "mlp_act": Opt(str),         # unset: the export's activation with a USP init, else gelu_tanh (DiT)
            "class_dropout_prob": 0.1,   # label dropout for classifier-free guidance
        },
        "ema": {
            "decay": 0.9999,             # DiT/SiT EMA; updated after every optimizer step
        },
        "sample": {
            "checkpoint": Opt(str),      # generator/ folder or checkpoint folder (default: this run's generator/,
                                         # else its latest checkpoint)
            "method": "auto",            # auto (DiT: ddpm, SiT: sde); ddpm, ddim | ode-heun, ode-euler, sde
            "steps": 250,                # sampling steps (DiT: respaced DDPM/DDIM steps; SiT: solver steps)
            "cfg_scale": 1.0,            # classifier-free guidance; 1 = plain conditional sampling
            "cfg_channels": Opt(int),    # guide only the first k latent channels (DiT/SiT reference: 3); unset: all
            "ema": True,                 # sample with the EMA weights
            "num_images": 50000,         # images to generate in total (ADM FID protocol: 50k)
            "batch": 64,                 # images per forward per rank
            "seed": 0,                   # noise and labels of batch k come from (seed, k): any rank count agrees
            "grid": 64,                  # images in the PNG grid
            "out_dir": Opt(str),         # default: <run>/samples/<checkpoint>-<method><steps>-cfg<scale>-seed<seed>
            "precision": "fp32",         # fp32 (as DiT's FID runs; TF32 matmuls on GPU) or bf16 (autocast, GPU)
            "ddim_eta": 0.0,             # DDIM noise (0: deterministic)
            "sde_last_step": 0.04,       # SiT SDE: size of the final mean-only step
        },
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        g = cfg.generate
        self.init_path = parse_init(g.init)
        if cfg.train.zero_stage == 3:
            raise ValueError("generate: the EMA needs every rank to hold the full parameters; use train.zero_stage "
                             "0, 1 or 2 (ZeRO-3 is not supported for the generate stage)")
        clash = sorted(set(cfg.model.overrides or {}) & set(GENERATE_KEYS))
        if clash:
            raise ValueError(f"model.overrides sets {clash}: set them as generate.<key> instead")
        self.objective, self.objective_name = None, None
        self.ema = None
        self.null_class = None
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name

    # ---- model ----
    def model_spec(self, manifest, export_meta=None):
        """-> DiTConfig for this run, from the registry name, the cache and (with a USP init) the export."""
        g = self.cfg.generate
        overrides = dict(self.cfg.model.overrides or {})
        for key, value in (("in_channels", manifest["latent_channels"]), ("input_size", manifest["latent_size"]),
                           ("num_classes", manifest["num_classes"])):
            if overrides.setdefault(key, value) != value:
                raise ValueError(f"model.overrides.{key}={overrides[key]} but the latent cache has {value}")
        usp = export_meta is not None
        overrides["learn_sigma"] = g.learn_sigma
        overrides["norm_affine"] = usp if g.norm_affine is None else g.norm_affine
        overrides["mlp_act"] = g.mlp_act or (export_meta["config"].get("mlp_act", "gelu") if usp else "gelu_tanh")
        overrides["class_dropout_prob"] = g.class_dropout_prob
        return model_config(self.cfg.model.name, **overrides)

    def build_model(self, manifest):
        source = meta = None
        if self.init_path is not None:
            source, meta = load_encoder(self.init_path)
            _check_vae(meta, manifest, self.init_path)
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
            report = transfer_to_dit(model, source, meta, self.cfg.generate.keep_blocks)
            log.info("transfer %s -> %s:\n%s", self.init_path, self.cfg.model.name, report.summary())
        self.ema = EMA(model, self.cfg.ema.decay)
        n = sum(p.numel() for p in model.parameters())
        log.info("model %s (%s, objective %s, init %s): %.2fM parameters, %d tokens, learn_sigma=%s, "
                 "norm_affine=%s, mlp_act=%s", self.cfg.model.name, spec.family, self.objective_name,
                 self.cfg.generate.init, n / 1e6, spec.grid_size**2, spec.learn_sigma, spec.norm_affine, spec.mlp_act)
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if report is not None:
                atomic_write_text(self.run_dir / "transfer.json", json.dumps(report.as_dict(), indent=1))
            atomic_write_text(self.run_dir / "generator.json", json.dumps(self.generator_meta(model, manifest), indent=1))
        return model

    def generator_meta(self, model, manifest, step=None, epoch=None):
        return {"format": GENERATOR_FORMAT, "model": self.cfg.model.name, "config": model.config_dict(),
                "objective": self.objective_name, "init": self.cfg.generate.init,
                "latent_channels": manifest["latent_channels"], "latent_size": manifest["latent_size"],
                "num_classes": manifest["num_classes"], "class_names": manifest.get("class_names"),
                "resolution": manifest["resolution"], "vae": manifest["vae"], "ema_decay": self.cfg.ema.decay,
                "step": step, "epoch": epoch}

    def param_groups(self, model):
        return decay_groups(model, self.cfg.optim.weight_decay)

    # ---- training ----
    def loss(self, model, batch, generator):
        labels = drop_labels(batch["labels"], self.cfg.generate.class_dropout_prob, self.null_class, generator)
        return self.objective.training_loss(model, batch["latents"], labels, generator)

    def after_step(self, model, step):
        self.ema.update(model)

    def state_dict(self):
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state):
        if "ema" not in state:
            raise KeyError("checkpoint has no EMA state: was it written by --stage generate?")
        self.ema.load_state_dict(state["ema"])

    def finish(self, model, run_dir, manifest, step, epoch):
        out = Path(run_dir) / "generator"
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
        ema = {**weights, **{k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}}
        for name, tensors in (("model.safetensors", weights), ("ema.safetensors", ema)):
            with atomic_path(out / name) as tmp:
                save_file(tensors, str(tmp))
        atomic_write_text(out / "generator.json", json.dumps(self.generator_meta(model, manifest, step, epoch), indent=1))
        log.info("saved generator weights (model + EMA) to %s", out)
        return {"generator": str(out)}
