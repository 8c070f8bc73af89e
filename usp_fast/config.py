"""Typed configs, checked at load: one pydantic schema per stage, the one home of every key's default and doc.

A config is a YAML file merged with `group.key=value` overrides (values parsed as YAML), validated against the
stage's schema before any process group, VAE, model or data is touched. Unknown keys and mistyped choices fail
with one line naming the file (or override), the key and what was expected. `usp-fast config keys --stage S`
prints every key with its type, default and doc, and the README's key table is generated from the same schema.
"""
import copy
import typing
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = ["ConfigError", "parse_config", "to_dict", "schema_keys", "keys_markdown"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def registered(name, kind):
    """`name` if the model registry of `kind` (encoder: usp_vit, generator: dit) has it, else ValueError."""
    if kind == "encoder":
        from .models.usp_vit import MODELS
    else:
        from .models.dit import MODELS
    if name not in MODELS:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(MODELS))}")
    return name


def key(default, doc):
    return Field(default, description=doc)


class RunConfig(Section):
    name: str = key("usp", "run directory name under out_dir")
    out_dir: str = key("runs", "where checkpoints, logs, exports and pictures go")
    seed: int = key(0, "seeds data order, masking and noise; resume is exact from it")


class DataConfig(Section):
    root: Optional[str] = key(None, "ImageFolder tree (train/<class>/*.JPEG) or a directory of classes")
    file_list: Optional[str] = key(None, "alternative to root: a text file with 'path [label]' per line")
    resolution: int = key(224, "image side after the ADM-style centre crop (224 pretrain, 256 generation)")
    cache_dir: Optional[str] = key(None, "latent cache directory (default: <root>/../latents_<res>_<vae-tag>)")
    sample_posterior: bool = key(True, "draw mean + std * eps per step (false: use the posterior mean)")
    flip: bool = key(True, "pick the cached horizontal flip at random")
    num_workers: int = key(2, "data loader processes (cache path) or decode threads (online, cache build) per rank")
    fatal_bad_images: bool = key(False, "a corrupt image is an error instead of being skipped and counted")
    demo_images: int = key(0, ">0: build a demo ImageFolder of this many real photos at root if missing")
    auto_cache: bool = key(False, "a training stage builds (or finishes) a missing cache instead of refusing")
    source: Literal["cache", "online"] = key("cache", "cache (pre-encoded latents) or online (decode + crop + "
                                                      "VAE-encode each step)")
    decoder: Literal["auto", "dali", "pil"] = key("auto", "image decoder: auto (DALI on GPU when installed, else "
                                                          "PIL), dali or pil")
    crop: Literal["rrc", "center"] = key("rrc", "online crops: rrc (RandomResizedCrop, pretraining) or center "
                                                "(ADM, generation)")
    crop_scale: tuple[float, float] = key((0.2, 1.0), "RandomResizedCrop area fraction range (online path and "
                                                      "cache.views)")
    prefetch: int = key(2, "online: micro-batches decoded + encoded ahead of the training step")
    max_pixels: int = key(100_000_000, "larger images are skipped as bad input")
    randaug: str = key("", "online: timm RandAugment spec (e.g. rand-m9-mstd0.5-inc1) on each crop; '' = off")

    @field_validator("resolution")
    @classmethod
    def _positive(cls, v):
        if v <= 0:
            raise ValueError("must be a positive number of pixels")
        return v


class VAEConfig(Section):
    name: str = key("stabilityai/sd-vae-ft-ema", "diffusers AutoencoderKL folder, TAESD weights folder, hub id "
                                                 "already in the local cache, pixels or pixels:F (weight-free FxF space-to-depth, F=8 by default; demos) or "
                                                 "random-sd (architecture tests)")
    scale: float = key(0.18215, "latent scaling factor (SD-VAE 0.18215; TAESD family 1)")
    encode_batch: int = key(16, "images per VAE forward while caching or encoding online")
    normalize: Literal["none", "scalar", "channel"] = key(
        "none", "latent normalisation after vae.scale, from the cache manifest's statistics: none, scalar (one "
                "mean/std) or channel (per-channel mean/std); undone before decoding, recorded in every export")


class CacheConfig(Section):
    shard_size: int = key(4096, "images per shard file")
    dtype: Literal["float16", "float32"] = key("float16", "storage dtype of the posterior mean/std")
    views: int = key(0, "extra RandomResizedCrop views per image (view 0 is the centre crop); training picks one "
                        "view per image per epoch")


class ModelConfig(Section):
    name: str = key("usp_vit_b", "registry name: usp_vit_b/l/xl (pretrain), DiT-XL/2, SiT-B/2, ... (generate)")


class PretrainModelConfig(ModelConfig):
    mask_ratio: float = key(0.75, "fraction of latent patches masked (USP/MAE: 0.75)")
    decoder_dim: Optional[int] = key(None, "decoder width (unset: the registry's, 512 for B/L/XL)")
    decoder_depth: Optional[int] = key(None, "decoder blocks (unset: the registry's, 8 for B/L/XL)")
    decoder_heads: Optional[int] = key(None, "decoder attention heads (unset: the registry's, 16 for B/L/XL)")
    mlp_act: Literal["gelu", "gelu_tanh"] = key("gelu", "MLP activation: gelu (exact, as the official USP/MAE "
                                                        "pretraining); the DiT/SiT built from it uses gelu_tanh "
                                                        "either way")
    norm_pix: bool = key(True, "MSE against per-patch-normalised targets (USP/MAE norm-pix loss)")

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        return registered(v, "encoder")

    @field_validator("mask_ratio")
    @classmethod
    def _ratio(cls, v):
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v


class GeneratorModelConfig(ModelConfig):
    name: str = key("DiT-XL/2", "registry name: DiT-{S,B,L,XL}/{2,4,8}, SiT-..., plus Tiny and Test sizes")

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        return registered(v, "generator")


class OptimConfig(Section):
    blr: float = key(1.5e-4, "base lr; lr = blr * global_batch / 256 (ignored when optim.lr is set)")
    lr: Optional[float] = key(None, "absolute lr (overrides the blr scaling)")
    min_lr: float = key(0.0, "floor of the cosine")
    weight_decay: float = key(0.05, "AdamW decay; not applied to biases, norms, tokens, pos-emb")
    betas: tuple[float, float] = key((0.9, 0.95), "AdamW betas")
    warmup_epochs: float = key(40.0, "linear warm-up length in epochs (ignored when warmup_steps is set)")
    warmup_steps: Optional[int] = key(None, "linear warm-up length in optimizer steps (overrides warmup_epochs)")
    schedule: Literal["cosine", "constant", "poly"] = key("cosine", "after warm-up: half-cosine per step to min_lr, "
                                                                    "constant, or poly (min_lr + (lr - min_lr) x "
                                                                    "(1 - progress)^poly_power, mmseg's PolyLR)")
    poly_power: float = key(1.0, "optim.schedule=poly: the power (mmseg/BEiT segmentation: 1.0)")
    grad_clip: float = key(0.0, "global gradient-norm clip; 0 disables it")
    impl: Literal["auto", "torch", "apex"] = key(
        "auto", "AdamW implementation: torch (fused on CUDA), apex (NVIDIA apex FusedAdam, if installed: it is not "
                "on PyPI); auto: torch until a committed GPU measurement shows apex faster")


class TrainConfig(Section):
    epochs: float = key(800, "training length in epochs of the data set")
    drop_last: bool = key(True, "an epoch is floor(N / global_batch) steps, the tail of each shuffle unseen, as the "
                                "official DataLoader(drop_last=True) (800 ImageNet epochs at 4096: 249,600 steps); "
                                "false: epochs laid end to end, every sample once per epoch")
    max_steps: Optional[int] = key(None, "cap on optimizer steps (demos, smoke runs, step-budgeted recipes)")
    global_batch: int = key(4096, "images per optimizer step over all ranks (accumulation fills the gap)")
    micro_batch: int = key(256, "images per rank per forward")
    precision: Literal["auto", "bf16", "fp32"] = key(
        "auto", "auto (bf16 on GPU, fp32 on CPU); bf16: bf16 compute, fp32 master weights, EMA and exports, fp32 "
                "gradient accumulation (ZeRO >= 1); fp32: fp32 weights with TF32 matmuls on GPU (the official "
                "DiT/SiT recipe)")
    zero_stage: Literal[0, 1, 2, 3] = key(1, "DeepSpeed ZeRO stage")
    log_every: int = key(50, "steps between metric logs (the only host syncs of the loop)")
    ckpt_every: int = key(1000, "steps between checkpoints")
    keep_last: int = key(3, "complete checkpoints kept")
    export: bool = key(True, "pretrain: export the encoder at the end (generate always saves generator/)")
    run_steps: Optional[int] = key(None, "stop after this many steps in this invocation (time-limited jobs); "
                                         "continue with --resume auto")
    audit_samples: bool = key(False, "each rank writes the sample indices it trains on to samples_r<rank>.txt")
    nonfinite: Literal["stop", "skip"] = key("stop", "a non-finite loss or grad-norm: stop (checked at log "
                                                     "intervals, nothing non-finite is saved) or skip the "
                                                     "micro-batch and count it (one host sync per micro-step)")
    activation_checkpointing: bool = key(False, "recompute each transformer block's activations in the backward "
                                                "pass instead of keeping them (non-reentrant torch.utils.checkpoint): "
                                                "activation memory of about one block, for about one more forward")
    compile: bool = key(False, "torch.compile the model (DeepSpeed's engine.compile; the fused Triton ops are "
                               "torch.library custom ops, so they do not break the graph)")
    compile_backend: str = key("inductor", "torch.compile backend of train.compile (inductor; aot_eager to debug)")
    deepspeed_config: Optional[typing.Union[str, dict]] = key(
        None, "DeepSpeed settings merged over the generated config (logged): a mapping, or a JSON/YAML file read at "
              "load; keys the run sets itself (batch sizes, accumulation, ZeRO stage, precision, clipping) may repeat "
              "its values, never change them, and optimizer/scheduler are the stage's")

    @field_validator("deepspeed_config")
    @classmethod
    def _read_deepspeed_config(cls, v):
        if isinstance(v, str):  # read now: config.yaml then records the settings the run used, not a path
            v = read_yaml(v)
            if not isinstance(v, dict):
                raise ValueError(f"{v!r} is not a mapping of DeepSpeed settings")
        return v

    @model_validator(mode="after")
    def _batches(self):
        for name in ("global_batch", "micro_batch", "log_every", "ckpt_every", "keep_last", "max_steps", "run_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:  # 0 or less would train nothing, silently
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise ValueError(f"train.epochs must be positive, got {self.epochs}")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"train.global_batch {self.global_batch} is not a multiple of train.micro_batch "
                             f"{self.micro_batch}")
        return self


class Config(Section):
    """What every stage shares."""
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    vae: VAEConfig = VAEConfig()
    cache: CacheConfig = CacheConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()


class PretrainConfig(Config):
    model: PretrainModelConfig = PretrainModelConfig()


class CacheStageConfig(PretrainConfig):
    """--stage cache reads only run, data, vae and cache, so it takes any stage's config file: the cache a generate
    (finetune, probe) run trains on is built from that run's own config, and the other stages' groups (model,
    optim, train, generate, ...) are ignored rather than checked against the pretrain schema."""

    @model_validator(mode="before")
    @classmethod
    def _ignore_training_groups(cls, values):
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if k not in _training_groups()}
        return values


# ---- generate ----
class GenerateSection(Section):
    init: str = key("random", "'random' or 'usp:<encoder export dir>' (from --stage pretrain)")
    keep_blocks: Optional[int] = key(None, "USP init: copy only the first N blocks, re-initialise the rest "
                                           "(paper Table 8g)")
    objective: Literal["auto", "ddpm", "linear"] = key("auto", "auto (DiT: ddpm, SiT: linear), ddpm or linear")
    learn_sigma: Optional[bool] = key(None, "unset: true for DiT (2C outputs), false for SiT")
    norm_affine: Optional[bool] = key(None, "unset: true with a USP init (the ViT's LayerNorm affine), false "
                                            "(DiT's) otherwise")
    mlp_act: Optional[Literal["gelu", "gelu_tanh"]] = key(None, "unset: gelu_tanh (DiT, and the official USP DiT/SiT "
                                                                "after transfer); gelu: the exact GELU the ViT "
                                                                "pretrained with")
    class_dropout_prob: float = key(0.1, "label dropout for classifier-free guidance")
    unconditional: bool = key(False, "label-free training and sampling: every label is the null class (one "
                                     "model pass per sampling step, no guidance); for data without classes")
    transfer_norms: bool = key(True, "USP init: copy the ViT's LayerNorm affine into the blocks (false: the "
                                     "paper's Table 8b ablation, norms keep their fresh init)")
    pos_interp: Literal["bicubic", "bilinear"] = key("bicubic", "USP init: position-embedding resize (bilinear: "
                                                                "the paper's 512 px setting, Table 10)")

    @field_validator("init")
    @classmethod
    def _init(cls, v):
        if v != "random" and not (v.startswith("usp:") and len(v) > 4):
            raise ValueError("expected 'random' or 'usp:<encoder export directory>'")
        return v


class EMASection(Section):
    decay: float = key(0.9999, "DiT/SiT EMA decay; updated after every optimizer step")
    warmup: bool = key(False, "timm ModelEmaV3 warm-up: decay min(decay, 1 - (1 + step)^-2/3), so short runs' EMA "
                              "is not dominated by the initial weights (the paper recipe: off)")


class SampleSection(Section):
    checkpoint: Optional[str] = key(None, "generator/ folder or checkpoint folder (default: this run's "
                                          "generator/, else its latest checkpoint)")
    method: Literal["auto", "ddpm", "ddim", "ode-heun", "ode-euler", "ode-dopri5", "sde"] = key(
        "auto", "auto (DiT: ddpm, SiT: sde); DiT: ddpm, ddim; SiT: ode-dopri5 (adaptive, SiT's ODE default), "
                "ode-heun, ode-euler, sde (SiT's FID sampler)")
    steps: int = key(250, "sampling steps (DiT: respaced DDPM/DDIM steps; SiT: the official num_steps, grid points "
                          "of linspace(t0, t1, steps): a fixed-grid ODE takes steps - 1 steps, the SDE steps "
                          "evaluations)")
    ode_atol: float = key(1e-6, "SiT ode-dopri5: absolute tolerance (SiT's default)")
    ode_rtol: float = key(1e-3, "SiT ode-dopri5: relative tolerance (SiT's default)")
    cfg_scale: float = key(1.0, "classifier-free guidance scale; 1 = plain conditional (or unconditional) "
                                "sampling")
    cfg_channels: Optional[int] = key(None, "guide only the first k latent channels (DiT/SiT reference: 3); "
                                            "unset: all")
    ema: bool = key(True, "sample with the EMA weights")
    num_images: int = key(50000, "images to generate in total (ADM FID protocol: 50k)")
    batch: int = key(64, "images per forward per rank")
    seed: int = key(0, "noise and labels of batch k come from (seed, k): any rank count agrees")
    grid: int = key(64, "images in the PNG grid")
    classes: list[int] = key([], "fix the classes: the images cycle through them in blocks of grid/len(classes), so "
                                 "each grid row is one class, labelled; [] = random classes (or the null class of "
                                 "an unconditional model)")
    out_dir: Optional[str] = key(None, "default: <run>/samples/<checkpoint>-<method><steps>-cfg<scale>-seed<seed>")
    precision: Literal["fp32", "bf16"] = key("fp32", "fp32 (as DiT's FID runs; TF32 matmuls on GPU) or bf16 "
                                                     "(autocast, GPU)")
    ddim_eta: float = key(0.0, "DDIM noise (0: deterministic)")
    sde_last_step: float = key(0.04, "SiT SDE: size of the final mean-only step")
    clip_denoised: Literal["auto", "on", "off"] = key(
        "auto", "DiT samplers: clamp each step's predicted x0 to the autoencoder's value range (ADM's pixel-space "
                "clip_denoised); auto: on for vae.name=pixels (bounded), off for learned VAEs (unbounded, as DiT)")

    @model_validator(mode="after")
    def _positive(self):
        for name in ("num_images", "batch", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sample.{name} must be positive, got {getattr(self, name)}")
        if self.grid < 0:
            raise ValueError(f"sample.grid must be 0 or more, got {self.grid}")
        return self


class GenerateConfig(Config):
    model: GeneratorModelConfig = GeneratorModelConfig()
    generate: GenerateSection = GenerateSection()
    ema: EMASection = EMASection()
    sample: SampleSection = SampleSection()


# ---- understanding ----
class FinetuneSection(Section):
    encoder: str = key("", "encoder export folder (runs/<pretrain>/export) from --stage pretrain")
    layer_decay: float = key(0.75, "layer-wise lr decay: block i of L gets lr * decay^(L - i)")
    drop_path: float = key(0.1, "stochastic depth rate (linearly increasing over blocks)")
    mixup: float = key(0.8, "Mixup alpha (0 = off)")
    cutmix: float = key(1.0, "CutMix alpha (0 = off)")
    label_smoothing: float = key(0.1, "label smoothing of the (mixed) targets")
    val_cache_dir: str = key("", "latent cache of held-out images for the final top-1; '' = no evaluation")
    eval_batch: int = key(256, "latents per forward in the final evaluation")


class FinetuneConfig(Config):
    finetune: FinetuneSection = FinetuneSection()


class ProbeSection(Section):
    encoder: str = key("", "encoder export folder (runs/<pretrain>/export) from --stage pretrain")
    generator: str = key("", "or a DiT/SiT: a generate run's generator/ folder or a checkpoint folder (per-block)")
    noise_level: float = key(0.0, "DiT/SiT features at this fraction of the way to noise (DiT t = level*999, "
                                  "SiT t = 1 - level, t = 1 being data)")
    pool: Literal["cls", "avg"] = key("cls", "cls (the cls token after the final norm, MAE) or avg (mean of "
                                             "patch tokens)")
    blocks: list[int] = key([], "per-block probe: block indices ([-1] = all); empty = the final features only")
    val_cache_dir: str = key("", "latent cache of the validation images (same VAE, resolution); '' = train set")
    momentum: float = key(0.9, "LARS momentum")
    trust_coeff: float = key(0.001, "LARS trust coefficient")
    feature_batch: int = key(256, "latents per encoder forward while extracting features")
    feature_dtype: Literal["float16", "bfloat16", "float32"] = key("float16", "storage of the extracted features")


class ProbeConfig(Config):
    probe: ProbeSection = ProbeSection()


class SegmentSection(Section):
    init: str = key("random", "'random' (the baseline) or 'usp:<encoder export dir>' (from --stage pretrain)")
    num_classes: int = key(0, "classes 1..N in the masks (0 = ignored); 0: as many as <data.root>/classes.txt "
                              "names (ADE20K: 150)")
    img_scale: tuple[int, int] = key((2048, 512), "(long, short) side the image is resized to fit, keeping its "
                                                  "aspect, before the random ratio (mmseg ADE20K)")
    ratio_range: tuple[float, float] = key((0.5, 2.0), "random scale ratio range of img_scale (training views)")
    cat_max_ratio: float = key(0.75, "a training crop is redrawn (up to 10 times) while one class covers more than "
                                     "this share of it (mmseg RandomCrop)")
    out_indices: list[int] = key([], "the four blocks whose token maps feed the neck (0-based); [] = BEiT/MAE's "
                                     "scaled with depth (12: 3,5,7,11; 24: 7,11,15,23)")
    head_channels: Optional[int] = key(None, "UPerNet width (unset: the encoder width, as mmseg's upernet_mae 768)")
    aux_channels: int = key(256, "auxiliary FCN head width (mmseg: 256)")
    aux_weight: float = key(0.4, "weight of the auxiliary FCN head's cross-entropy (mmseg: 0.4)")
    dropout: float = key(0.1, "dropout before each classifier (mmseg: 0.1)")
    drop_path: float = key(0.1, "ViT stochastic depth rate (mmseg upernet_mae ViT-B: 0.1)")
    layer_decay: float = key(0.65, "layer-wise lr decay: block i of L gets lr x decay^(L + 1 - i) (BEiT/MAE ViT-B "
                                   "ADE20K: 0.65)")
    views: int = key(0, "0: decode, augment and VAE-encode every step (online); V > 0: cache V fixed training "
                        "views per image (latents + masks) in segment.cache_dir and draw one per image per epoch")
    cache_dir: str = key("", "the view cache folder ('' = <data.root>/../<root name>_views<V>_<res>_<vae>)")
    eval_stride: int = key(341, "sliding-window stride in pixels (window: data.resolution; BEiT ADE20K: 341)")
    eval_images: int = key(0, "validation images scored at the end (0 = all)")
    pictures: int = key(4, "validation images in <run>/segment_val.png (image, ground truth, prediction)")
    demo_images: int = key(0, ">0: build a mosaic set of this many training images (a quarter as many for "
                              "validation) at data.root if missing (usp_fast/data/mosaic.py)")
    demo_photos: str = key("../shared/data/clothing-256", "the mosaic set's photos: an ImageFolder with train/ and "
                                                          "validation/ splits; missing: scikit-image's photographs")

    @field_validator("init")
    @classmethod
    def _init(cls, v):
        if v != "random" and not (v.startswith("usp:") and len(v) > 4):
            raise ValueError("expected 'random' or 'usp:<encoder export directory>'")
        return v

    @model_validator(mode="after")
    def _ranges(self):
        if self.num_classes < 0 or self.num_classes > 255:
            raise ValueError(f"segment.num_classes must be 0..255 (masks are 8-bit), got {self.num_classes}")
        if self.views < 0 or self.eval_stride <= 0:
            raise ValueError("segment.views must be >= 0 and segment.eval_stride positive")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"segment.ratio_range {list(self.ratio_range)}: expected 0 < low <= high")
        return self


class SegmentModelConfig(ModelConfig):
    name: str = key("usp_vit_b", "segment.init=random: the usp_vit_* encoder to build (a USP init takes the "
                                 "export's architecture)")

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        return registered(v, "encoder")


class SegmentConfig(Config):
    model: SegmentModelConfig = SegmentModelConfig()
    segment: SegmentSection = SegmentSection()


def _training_groups():
    """The groups of every stage's schema that building a latent cache does not read."""
    stages = (PretrainConfig, GenerateConfig, FinetuneConfig, ProbeConfig, SegmentConfig)
    return {group for cls in stages for group in cls.model_fields} - {"run", "data", "vae", "cache"}


# ---- loading ----
def _format_error(err, source, cls):
    """The first pydantic error as one line: source, dotted key, what was expected, what was given."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "top level"
    if e["type"] == "extra_forbidden":
        parent = ".".join(str(p) for p in e["loc"][:-1])
        section = cls
        for part in e["loc"][:-1]:
            section = typing.get_type_hints(section)[part] if isinstance(section, type) else section
        valid = ", ".join(sorted(section.model_fields)) if isinstance(section, type) else "?"
        return f"{source}: unknown key '{loc}'; valid keys {'in ' + repr(parent) if parent else 'here'}: {valid}"
    msg = e["msg"].removeprefix("Value error, ")
    given = e.get("input")
    shown = "" if isinstance(given, dict) or e["type"] == "missing" else f" (got {given!r})"
    return f"{source}: '{loc}': {msg}{shown}"


def parse_override(text):
    """'train.max_steps=100' -> (['train', 'max_steps'], 100). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.micro_batch=64")
    k, raw = text.split("=", 1)
    try:
        return k.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e.problem})") from e


def flatten(d, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1} (an empty mapping stays a value)."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _deep_update(base, upd):
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate(cls, values, source, overrides=()):
    """Validate; an error is attributed to the last override that set (part of) its key, else to `source`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of groups, got {type(values).__name__}")
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        loc = [str(p) for p in e.errors()[0]["loc"]]
        for item, keys in reversed(overrides):
            n = min(len(keys), len(loc))
            if keys[:n] == loc[:n]:
                source = f"override '{item}'"
                break
        raise ConfigError(_format_error(e, source, cls)) from None


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not a text file (byte {e.start} is not UTF-8); expected a YAML "
                          "mapping of groups (configs/<stage>/<name>.yaml)") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:  # one line: what is wrong, and where
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None


def parse_config(cls, path=None, overrides=()):
    """A YAML file (or an already-parsed dict; optional) and 'a.b=value' overrides -> a validated config of schema
    `cls` (a stage's schema: usp_fast.stages.load_config picks it by stage name). Raises ConfigError."""
    if isinstance(path, dict):
        values, path = copy.deepcopy(path), "<dict>"
    else:
        values = read_yaml(path) if path is not None else {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of groups, got {type(values).__name__}")
    parsed = []
    for item in overrides:
        keys, value = parse_override(item)
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        values = _deep_update(values, nested)
        parsed.append((item, keys))
    return _validate(cls, values, str(path or "<defaults>"), parsed)


def to_dict(cfg):
    """A config (or one section) -> plain dict for YAML/JSON (tuples as lists)."""
    return cfg.model_dump(mode="json")


# ---- documentation from the schema ----
def _type_name(annotation):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{'|'.join(_type_name(a) for a in inner)} or null"
    if origin is typing.Union:
        return "|".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def schema_keys(cls):
    """-> [(dotted key, type, default, doc)] for every key of a config schema."""
    rows = []
    for group, gfield in cls.model_fields.items():
        section = gfield.annotation
        for name, f in section.model_fields.items():
            default = f.default
            if isinstance(default, tuple):
                default = list(default)
            rows.append((f"{group}.{name}", _type_name(f.annotation), default, f.description or ""))
    return rows


def keys_markdown(schemas):
    """The key table of docs/configuration.md: every key of every stage ({stage: schema}), once, with the stages
    that have it. A stage whose schema adds nothing to an earlier one's (cache: pretrain's) is not a column."""
    def shown(d):
        return "unset" if d is None else yaml.safe_dump(d, default_flow_style=True).strip().removesuffix("...").strip()

    def same_as_its_base(cls):  # e.g. the cache stage's schema is the pretrain schema under another name
        return any(issubclass(cls, other) and other is not cls and schema_keys(other) == schema_keys(cls)
                   for other in schemas.values())

    seen, tables = {}, []
    for stage, cls in schemas.items():
        if same_as_its_base(cls):
            continue
        rows = schema_keys(cls)
        tables.append(rows)
        for k, t, d, doc in rows:
            entry = seen.setdefault(k, {"type": t, "doc": doc, "defaults": {}})
            entry["defaults"][stage] = shown(d)
    everywhere = len(tables)
    lines = ["| key | type | default | stages | what it does |", "| --- | --- | --- | --- | --- |"]
    for k, e in seen.items():
        stages = list(e["defaults"])
        where = "all" if len(stages) == everywhere else ", ".join(stages)
        values = set(e["defaults"].values())
        if len(values) == 1:
            default = f"`{values.pop()}`"
        else:
            default = ", ".join(f"`{v}` ({s})" for s, v in e["defaults"].items() if s in ("pretrain", "generate"))
        t = e["type"].replace("|", " \\| ")
        lines.append(f"| `{k}` | {t} | {default} | {where} | {e['doc'].replace('|', '/')} |")
    return "\n".join(lines)
