"""Strict YAML configs: a schema of defaults per key group, merged with a YAML file and `key=value` overrides.

Every stage shares the BASE schema; a stage adds its own groups/keys (`extra` in `load_config`). An unknown or
mistyped key is an error that names the file and lists the valid keys. Values are type-checked against the
default's type (int is accepted where a float is expected; a None default accepts anything).
"""
import copy
import re
from pathlib import Path
from types import SimpleNamespace

import yaml

class Opt:
    """Schema marker for a key that is unset (None) by default and otherwise of `type_`."""

    def __init__(self, type_):
        self.type = type_

    def __deepcopy__(self, memo):
        return self


# YAML 1.1 reads '2e-3' (no dot) as a string; accept it where a float is expected.
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

BASE_SCHEMA = {
    "run": {
        "name": "usp",            # run directory name under out_dir
        "out_dir": "runs",        # where checkpoints, logs and exports go
        "seed": 0,                # seeds data order, masking and noise; resume is exact from it
    },
    "data": {
        "root": Opt(str),             # ImageFolder tree (train/<class>/*.JPEG) or a directory of classes
        "file_list": Opt(str),        # alternative to root: a text file "path [label]" per line
        "resolution": 224,        # image side after the ADM-style centre crop
        "cache_dir": Opt(str),        # latent cache directory (default: <root>/../latents_<res>_<vae-tag>)
        "sample_posterior": True, # draw mean + std * eps per step (False: use the posterior mean)
        "flip": True,             # pick the cached horizontal flip at random
        "num_workers": 2,         # data loader processes per rank
        "fatal_bad_images": False,  # a corrupt image stops the cache build instead of being skipped
        "demo_images": 0,         # >0: build a demo ImageFolder of this many real photos at root if missing
        "auto_cache": False,      # a training stage builds (or finishes) a missing cache instead of refusing
        "source": "cache",        # cache (pre-encoded latents) or online (decode + crop + VAE-encode each step)
        "decoder": "auto",        # image decoder: auto (DALI on GPU when installed, else PIL), dali or pil
        "crop": "rrc",            # online crops: rrc (RandomResizedCrop, pretraining) or center (ADM, generation)
        "crop_scale": [0.2, 1.0], # RandomResizedCrop area fraction range (online path and cache.views)
        "prefetch": 2,            # online: micro-batches decoded + encoded ahead of the training step
        "max_pixels": 100000000,  # larger images are skipped as bad input
        "randaug": "",            # online: timm RandAugment (e.g. rand-m9-mstd0.5-inc1) on each crop; "" = off
    },
    "vae": {
        "name": "stabilityai/sd-vae-ft-ema",  # diffusers AutoencoderKL folder, TAESD weights folder, hub id (cached), random-sd
        "scale": 0.18215,         # SD-VAE latent scaling factor
        "encode_batch": 16,       # images per VAE forward while caching
    },
    "cache": {
        "shard_size": 4096,       # images per shard file
        "dtype": "float16",       # storage dtype of posterior mean/std
        "views": 0,               # extra RandomResizedCrop views per image (view 0 is the centre crop); training
                                  # picks one view per image per epoch, so the cached path keeps crop augmentation
    },
    "model": {
        "name": "usp_vit_b",      # registry name: usp_vit_b/l/xl (pretrain), DiT-XL/2, SiT-XL/2... (generate)
        "overrides": {},          # any USPViTConfig field, e.g. {decoder_depth: 4}
    },
    "optim": {
        "blr": 1.5e-4,            # base lr; lr = blr * global_batch / 256
        "lr": Opt(float),               # absolute lr (overrides blr scaling when set)
        "min_lr": 0.0,            # floor of the cosine
        "weight_decay": 0.05,     # not applied to biases, norms, tokens, pos-emb
        "betas": [0.9, 0.95],     # AdamW betas
        "warmup_epochs": 40.0,    # linear warm-up length
        "schedule": "cosine",     # cosine (half-cosine per iteration after warm-up) or constant
        "grad_clip": 0.0,         # 0 disables clipping
    },
    "train": {
        "epochs": 800,            # training length in epochs of the cached set
        "max_steps": Opt(int),        # optional cap on optimizer steps (demos, smoke runs)
        "global_batch": 4096,     # images per optimizer step, all ranks (accumulation fills the gap)
        "micro_batch": 256,       # images per rank per forward
        "precision": "auto",      # auto (bf16 on GPU, fp32 on CPU), bf16, fp32
        "zero_stage": 1,          # DeepSpeed ZeRO stage 0-3
        "log_every": 50,          # steps between metric logs (the only host syncs)
        "ckpt_every": 1000,       # steps between checkpoints
        "keep_last": 3,           # checkpoints kept
        "export": True,           # pretrain: export the encoder at the end (generate always saves generator/)
        "run_steps": Opt(int),        # stop after this many steps in this invocation (time-limited jobs); the
                                  # schedule still follows the full length; continue with --resume auto
        "audit_samples": False,   # each rank writes the sample indices it trains on to samples_r<rank>.txt
    },
}


class ConfigError(ValueError):
    pass


def _merge(schema, values, where, source):
    out = copy.deepcopy(schema)
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(values).__name__}")
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in schema:
            raise ConfigError(f"{source}: unknown key '{path}'; valid keys here: {', '.join(sorted(schema))}")
        default = schema[key]
        if isinstance(default, dict) and default and not (where and key == "overrides"):
            out[key] = _merge(default, value or {}, path, source)
        else:
            out[key] = _check_type(default, value, path, source)
    return out


def _check_type(default, value, path, source):
    if isinstance(default, Opt):
        if value is None or isinstance(value, Opt):  # unset (also when re-merging an already merged config)
            return None
        default = default.type()  # an instance of the type, for the checks below
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{path}' expects true/false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, bool):
        raise ConfigError(f"{source}: '{path}' expects an integer, got {value!r}")
    if not isinstance(value, type(default)):
        raise ConfigError(f"{source}: '{path}' expects {type(default).__name__}, got {value!r}")
    return value


def parse_override(text):
    """'train.max_steps=100' -> (['train', 'max_steps'], 100). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.micro_batch=64")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path=None, overrides=(), extra=None):
    """Load a config file over BASE_SCHEMA (+ `extra` stage groups), then apply 'a.b=value' overrides."""
    schema = copy.deepcopy(BASE_SCHEMA)
    for group, keys in (extra or {}).items():
        schema[group] = {**schema.get(group, {}), **keys}
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    cfg = _merge(schema, values, "", str(path or "<defaults>"))
    for item in overrides:
        keys, value = parse_override(item)
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = _merge(schema, _deep_update(cfg, nested), "", f"override '{item}'")
    return to_namespace(cfg)


def _deep_update(base, upd):
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides" else v
    return out


def to_namespace(d):
    if isinstance(d, Opt):
        return None
    if isinstance(d, dict):
        return SimpleNamespace(**{k: (v if k == "overrides" else to_namespace(v)) for k, v in d.items()})
    return d


def to_dict(ns):
    if isinstance(ns, SimpleNamespace):
        return {k: to_dict(v) for k, v in vars(ns).items()}
    return ns
