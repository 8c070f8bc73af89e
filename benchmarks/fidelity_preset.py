"""The fidelity experiment's preset, configs/fidelity/<name>.yaml: its typed schema (the one place it is defined),
its loader, and what follows from it (the arms, the evaluated steps)."""
from pathlib import Path
from typing import NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from usp_fast.errors import ConfigError
from usp_fast_benchmarks.env import REPO

PRESETS = REPO / "configs" / "fidelity"
# usp_random: the USP transfer from an untrained encoder (same architecture, transfer and latent norm): what the
# copied weights' statistics alone do, without pretraining
ARMS = ("scratch", "usp", "usp_random", "usp_no_ln", "usp_no_normpix", "usp_reinit_last")
DOSE_PREFIX = "usp_pt"  # dose-response arms: usp_pt<N>, the transfer from an encoder pretrained for N steps


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PretrainSpec(_Section):
    model: str = "usp_vit_tiny"
    steps: int = 1500
    global_batch: int = 128
    micro_batch: int = 128
    lr: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05


class GenerateSpec(_Section):
    dit: str = "DiT-Tiny/2"
    sit: str = "SiT-Tiny/2"
    steps: int = 600
    global_batch: int = 32
    micro_batch: int = 32
    lr: float = 2e-4
    ema_decay: float = 0.999
    ema_warmup: bool = True
    dit_arms: list[str] = list(ARMS)
    sit_arms: list[str] = ["scratch", "usp"]
    clothing_arms: list[str] = ["scratch", "usp"]
    # dose-response (DiT, ImageNet): the usp transfer from encoders pretrained for these many steps, each its own
    # cosine-annealed run (0 is usp_random, pretrain.steps is usp: both reused), at the first `dose_seeds` seeds
    dose_steps: list[int] = []
    dose_seeds: int = 1


class EvalSpec(_Section):
    checkpoints: int = 5
    num_samples: int = 200
    batch: int = 100
    dit_method: str = "ddim"
    sit_method: str = "ode-euler"
    sampling_steps: int = 25
    seed: int = 0
    bootstrap: int = 100
    precision: str = "fp32"          # sample.precision of the evaluation: fp32 (CPU) or bf16 (GPU presets)
    kid_subsets: int = 100
    kid_subset_size: int = 1000       # capped at the sample count
    # FID extrapolated to infinite samples (Chong & Forsyth 2020): FID of random subsets at `fid_inf_points`
    # sizes from `fid_inf_min` of the samples to all of them, fitted linearly against 1/n; the intercept is FID_inf
    fid_inf_points: int = 5
    fid_inf_min: float = 0.5
    fid_inf_draws: int = 5            # subsets averaged per size


class ProbeSpec(_Section):
    epochs: int = 100
    global_batch: int = 256
    lr: float = 6.4
    warmup_epochs: int = 10


class Arm(NamedTuple):
    """One generator run: the dataset it trains on ('imagenet' unconditional, 'clothing' class-conditional), its
    family ('DiT' or 'SiT'), its initialisation (one of ARMS, or usp_pt<N>) and its training seed (init, data
    order and training noise; the evaluation noise is the same for every arm and seed)."""
    dataset: str
    family: str
    arm: str
    seed: int = 0

    @property
    def group(self):
        """The arms compared with each other: 'dit', 'sit', 'clothing_dit'."""
        return f"{'' if self.dataset == 'imagenet' else 'clothing_'}{self.family.lower()}"

    @property
    def name(self):
        """Its results key (every seed together): 'dit_usp', 'sit_scratch', 'clothing_dit_usp', ..."""
        return f"{self.group}_{self.arm}"

    @property
    def run_name(self):
        """Its run folder: 'dit_usp_seed0', ..."""
        return f"{self.name}_seed{self.seed}"

    @property
    def dose(self):
        """The pretraining steps of a usp_pt<N> arm's encoder, else None."""
        return int(self.arm.removeprefix(DOSE_PREFIX)) if self.arm.startswith(DOSE_PREFIX) else None


class Preset(_Section):
    name: str
    shared: str = "../shared"
    work: str = ""                   # the default work folder ("": runs/fidelity-<name>); a preset naming another's
                                     # reuses its caches, encoders and identically configured arms
    images: str = "data/imagenet-samples/train"
    clothing: str = "data/clothing-256"
    vae: str = "weights/taef2"
    num_images: int = 0              # 0: every image
    clothing_per_class: int = 100    # train images per class (balanced subset)
    clothing_test: int = 0           # 0: the whole test split
    resolution: int = 128
    pretrain_resolution: int = 112
    views: int = 3
    normalize: str = "channel"
    seed: int = 0                    # pretraining, probes, the untrained encoder
    seeds: list[int] = [0]           # the arms' training seeds
    # measured costs (seconds; see the preset's header) for the estimated time printed at start
    cost: dict[str, float] = {}
    restore_images: int = 6
    pretrain: PretrainSpec = PretrainSpec()
    generate: GenerateSpec = GenerateSpec()
    eval: EvalSpec = EvalSpec()
    probe: ProbeSpec = ProbeSpec()

    def datasets(self):
        """The datasets generators train on (and whose real-image references are computed): ImageNet, and the
        clothing set if it has arms."""
        return ["imagenet"] + (["clothing"] if self.generate.clothing_arms else [])

    def needs_raw_encoder(self):
        """The raw-target encoder (Table 8c) is pretrained only for the usp_no_normpix arms."""
        g = self.generate
        return "usp_no_normpix" in g.dit_arms + g.sit_arms + g.clothing_arms

    def dose_arms(self):
        """The dose-response arms that need their own encoder: usp_pt<N> for N strictly between 0 and
        pretrain.steps (0 is usp_random, pretrain.steps is usp)."""
        return [f"{DOSE_PREFIX}{n}" for n in self.generate.dose_steps if 0 < n != self.pretrain.steps]

    def arms(self):
        """Every generator run, in the order they are trained: seed by seed (an interrupted experiment has whole
        seeds), ImageNet DiT arms, ImageNet SiT arms, clothing DiT, then the dose arms of the first seeds."""
        g = self.generate
        runs = []
        for i, seed in enumerate(self.seeds):
            runs += ([Arm("imagenet", "DiT", a, seed) for a in g.dit_arms]
                     + [Arm("imagenet", "SiT", a, seed) for a in g.sit_arms]
                     + [Arm("clothing", "DiT", a, seed) for a in g.clothing_arms])
            if i < g.dose_seeds:
                runs += [Arm("imagenet", "DiT", a, seed) for a in self.dose_arms()]
        return runs

    def eval_steps(self):
        """The training steps at which every arm is evaluated: `eval.checkpoints` evenly spaced, the last one final."""
        n, k = self.generate.steps, self.eval.checkpoints
        return [round(n * (i + 1) / k) for i in range(k)]


def load_preset(name_or_path):
    """A preset name (configs/fidelity/<name>.yaml) or YAML path -> (Preset, path). Raises ConfigError."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"fidelity preset {name_or_path!r}: no file {path} (presets: {known})")
    try:
        preset = Preset.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{path}: '{'.'.join(map(str, err['loc']))}': {err['msg']}") from None
    for group in ("dit_arms", "sit_arms", "clothing_arms"):
        bad = [a for a in getattr(preset.generate, group) if a not in ARMS]
        if bad:
            raise ConfigError(f"{path}: generate.{group}: unknown arm(s) {bad}; valid: {', '.join(ARMS)}")
    g = preset.generate
    if g.dose_steps and not {"scratch", "usp"} <= set(g.dit_arms):
        raise ConfigError(f"{path}: generate.dose_steps needs the scratch and usp DiT arms")
    if 0 in g.dose_steps and "usp_random" not in g.dit_arms:
        raise ConfigError(f"{path}: generate.dose_steps has 0 (usp_random) but generate.dit_arms lacks usp_random")
    if not preset.seeds or len(set(preset.seeds)) != len(preset.seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct seeds")
    if preset.pretrain_resolution % 16 or preset.resolution % 16:
        raise ConfigError(f"{path}: resolutions must be multiples of 16 (VAE /8, patch 2)")
    return preset, path
