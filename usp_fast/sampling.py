"""Sampling a trained DiT/SiT (library; the command is `usp-fast sample --config configs/generate/X.yaml
[sample.key=value ...]`, several GPUs: `torchrun --nproc_per_node N -m usp_fast sample --config ...`).

Reads the generate run's weights (sample.checkpoint, default <run>/generator/ or the run's latest checkpoint),
EMA weights by default, and writes into sample.out_dir:
  samples.npz  uint8 [N, H, W, 3] under 'arr_0': the ADM / guided-diffusion evaluator's FID input
  grid.png     the first sample.grid images
  samples.json what produced them (checkpoint, step, sampler, steps, guidance, seed)
While it runs, each global batch is its own file shards/batch_KKKKKK.npy (written atomically) beside
shards/plan.json (what the images depend on). A killed run resumes: rerun the same command, on any number of
ranks, and only the missing batches are made; the shards are merged into samples.npz at the end and deleted.
All ranks must see the same sample.out_dir (a shared filesystem), or the shards are copied together and the
command rerun on one rank, which then only merges (merge_shards).
Samplers: DiT: ddpm (respaced ancestral, 250 steps default) or ddim; SiT: sde, ode-dopri5, ode-heun or ode-euler
(Euler-Maruyama, last step the mean). Guidance: sample.cfg_scale on the prediction channels (first
sample.cfg_channels latent channels; the DiT/SiT reference guides 3 of 4); DiT's variance channels are never guided.

Determinism: images are made in global batches of sample.batch; batch k draws its labels, initial noise and
sampler noise from one generator seeded by (sample.seed, k), and rank r of W makes batches r, r+W, ... So a seed
gives the same images on any number of ranks (for a fixed batch size and device type).
"""
import json
import logging
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from usp_fast import dist
from usp_fast.diffusion import GaussianDiffusion, create_objective, guided_model
from usp_fast.diffusion import sample as run_sampler
from usp_fast.errors import UserError
from usp_fast.artifacts import find_generator, run_dir
from usp_fast.io import atomic_path, atomic_write_text
from usp_fast.models.dit import DiT
from usp_fast.pictures import image_grid, save_png, to_uint8
from usp_fast.seeding import sample_batch_seed

log = logging.getLogger(__name__)

DEFAULT_METHOD = {"ddpm": "ddpm", "linear": "sde"}


# ---- weights ----------------------------------------------------------------------------------------------------
def find_checkpoint(cfg):
    """sample.checkpoint, else <run>/generator/, else the run's latest complete checkpoint."""
    return find_generator(run_dir(cfg.run), cfg.sample.checkpoint)


def load_generator(path, use_ema=True):
    """-> (DiT on CPU, fp32, eval; meta): see DiT.from_pretrained."""
    return DiT.from_pretrained(path, ema=use_ema)


# ---- sampling ---------------------------------------------------------------------------------------------------
def batch_generator(seed, k, device):
    return torch.Generator(device=device).manual_seed(sample_batch_seed(seed, k))


def classes_per_row(scfg):
    """With sample.classes: images per class block, which is also the grid's row length (one class per row)."""
    return max(scfg.grid // len(scfg.classes), 1)


def fixed_class(scfg, i):
    """The class of image i under sample.classes: blocks of classes_per_row images per class, cycling."""
    return scfg.classes[(i // classes_per_row(scfg)) % len(scfg.classes)]


def sampler_options(scfg, method):
    """The sample.* keys that `method` reads besides the steps, as the sampler's keyword arguments."""
    return ({"eta": scfg.ddim_eta} if method == "ddim" else {"last_step_size": scfg.sde_last_step} if method == "sde"
            else {"atol": scfg.ode_atol, "rtol": scfg.ode_rtol} if method == "ode-dopri5" else {})


@torch.no_grad()
def sample_latents(model, objective, scfg, method, k, size, device, x0_range=None):
    """Global batch k of `size` images -> (latents [size, C, h, w] fp32, labels [size]). x0_range: see
    `denoised_range` (DiT samplers only)."""
    cfg = model.cfg
    gen = batch_generator(scfg.seed, k, device)
    noise = torch.randn((size, cfg.in_channels, cfg.input_size, cfg.input_size), device=device, generator=gen)
    if cfg.num_classes == 0:  # an unconditional model: the null class, one pass per step, no guidance
        if scfg.cfg_scale != 1.0:
            raise UserError(f"sample.cfg_scale={scfg.cfg_scale:g}: this model is unconditional (no classes to "
                            "guide towards); use sample.cfg_scale=1")
        if scfg.classes:
            raise UserError("sample.classes: this model is unconditional (trained without labels); leave it empty")
        labels = torch.full((size,), cfg.null_class, dtype=torch.long, device=device)
    elif scfg.classes:
        bad = [c for c in scfg.classes if not 0 <= c < cfg.num_classes]
        if bad:
            raise UserError(f"sample.classes {bad}: this model has classes 0..{cfg.num_classes - 1}")
        first = k * scfg.batch
        labels = torch.tensor([fixed_class(scfg, first + j) for j in range(size)], dtype=torch.long, device=device)
        torch.randint(0, cfg.num_classes, (size,), device=device, generator=gen)  # same noise as with random classes
    else:
        labels = torch.randint(0, cfg.num_classes, (size,), device=device, generator=gen)
    model_fn = guided_model(model, labels, scfg.cfg_scale, cfg.null_class, scfg.cfg_channels)
    extra = sampler_options(scfg, method)
    if x0_range is not None:
        extra["x0_range"] = tuple(r.to(device) for r in x0_range)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=scfg.precision == "bf16" and device.type == "cuda")
    with autocast:
        return run_sampler(objective, model_fn, noise, method, scfg.steps, gen, **extra), labels


def denoised_range(scfg, objective, vae, latent_norm):
    """sample.clip_denoised -> the (low, high) per-channel bounds [1, C, 1, 1] of the model's latents that a DiT
    sampler clamps its predicted x0 to, or None. A bounded autoencoder (vae.name=pixels: values in [-1, 1]) is
    clipped under auto, as ADM does in pixel space: an under-trained model's x0 estimate at high noise is its
    epsilon error times 1/sqrt(alpha_bar) (~150 at t=999), and unclamped it runs the chain off the data range.
    Learned VAE latents have no such bound (DiT samples them unclipped)."""
    mode, bounds = scfg.clip_denoised, vae.value_range
    if mode == "off" or (mode == "auto" and bounds is None):
        return None
    if bounds is None:
        raise UserError(f"sample.clip_denoised=on: vae {vae.identity['name']!r} has no known value range "
                        "(only vae.name=pixels has one); use auto or off")
    if not isinstance(objective, GaussianDiffusion):
        if mode == "on":
            raise UserError("sample.clip_denoised=on applies to DiT samplers (ddpm, ddim) only")
        return None
    C = vae.latent_channels
    lo, hi = (latent_norm.normalize(torch.full((1, C, 1, 1), float(v))) for v in bounds)
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


# ---- one-step denoising pictures ------------------------------------------------------------------------------
NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fraction of the way from the data (0) to pure noise (1)


def ddpm_step(objective, level):
    """Noise level in (0, 1) -> the DDPM step index: 0.5 -> 500 of 1000."""
    return min(round(level * objective.num_timesteps), objective.num_timesteps - 1)


@torch.no_grad()
def one_step_x0(model, objective, x0, labels, level, generator):
    """The model's estimate of clean latents `x0` from one noised copy at `level` in (0, 1): DDPM step
    `ddpm_step(level)`, x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); SiT time t = 1 - level (t = 1 is data),
    x1 = x_t + (1 - t) v."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    C = x0.shape[1]
    if isinstance(objective, GaussianDiffusion):
        t = torch.full((len(x0),), ddpm_step(objective, level), device=x0.device)
        x_t = objective.q_sample(x0, t, noise)
        return objective.predict_x0_from_eps(x_t, t, model(x_t, t, labels).float()[:, :C])
    t = torch.full((len(x0),), objective.time_at_noise_level(level), device=x0.device)
    x_t = objective.interpolate(x0, noise, t)
    return objective.data_from_velocity(model(x_t, t, labels).float()[:, :C], x_t, t)


def denoise_picture(sampler, folder, out, num=4, levels=NOISE_LEVELS, seed=0):
    """A picture of what the generator has learned about real images: `num` photos of an ImageFolder (spread
    over its classes, labelled by the model's class names) in the first row, then one row per noise level with
    the model's one-step estimate of each photo from a noised copy. -> the PNG path."""
    from usp_fast.data.images import image_files, load_images

    paths = image_files(folder)
    if not paths:
        raise UserError(f"images {folder}: no images found")
    paths = [paths[i * len(paths) // num] for i in range(num)] if len(paths) > num else paths
    model, cfg, dev = sampler.model, sampler.model.cfg, sampler.device
    names = sampler.meta.get("class_names") or []
    labels = torch.tensor([names.index(p.parent.name) if cfg.num_classes and p.parent.name in names
                           else cfg.null_class for p in paths], device=dev)
    images = load_images(paths, sampler.side).to(dev)
    x0 = sampler.latent_norm.normalize(sampler.vae.encode(images)[0].float())
    gen = torch.Generator(device=dev).manual_seed(seed)
    rows = [to_uint8(images)]
    for level in levels:
        est = one_step_x0(model, sampler.objective, x0, labels, level, gen)
        rows.append(to_uint8(sampler.vae.decode(sampler.latent_norm.denormalize(est))))
    ddpm = isinstance(sampler.objective, GaussianDiffusion)
    times = [f"t={ddpm_step(sampler.objective, level)}" if ddpm
             else f"t={sampler.objective.time_at_noise_level(level):g}" for level in levels]  # SiT: t = 1 is data
    grid = image_grid(np.concatenate(rows), cols=len(paths), gap=2,
                      row_labels=["real", *[f"from {t}" for t in times]])
    save_png(grid, out)
    return Path(out)


def npy_to_npz(npy_path, npz_path):
    """Wrap a .npy as 'arr_0' of an uncompressed .npz without loading it (50k images do not fit comfortably)."""
    with atomic_path(npz_path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(npy_path, arcname="arr_0.npy")


# ---- shards: one .npy per global batch, so a killed run resumes on any number of ranks ----------------------
def num_batches(plan):
    return math.ceil(plan["num_images"] / plan["batch"])


def shard_path(shards, k):
    return Path(shards) / f"batch_{k:06d}.npy"


def batch_shape(plan, k):
    """uint8 [size, H, W, 3] of global batch k (the last batch may be short)."""
    n, b, side = plan["num_images"], plan["batch"], plan["image_size"]
    return min(b, n - k * b), side, side, 3


def shard_complete(path, shape):
    """Whether `path` holds a whole uint8 batch of `shape`: anything else (absent, truncated by a copy, another
    run's size) is made again rather than trusted."""
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return images.dtype == np.uint8 and images.shape == tuple(shape)


def missing_batches(shards, plan):
    return [k for k in range(num_batches(plan)) if not shard_complete(shard_path(shards, k), batch_shape(plan, k))]


def check_shards(shards, plan):
    missing = missing_batches(shards, plan)
    if missing:
        raise UserError(f"{shards}: {len(missing)} of {num_batches(plan)} batches are missing or incomplete (first: "
                        f"{missing[0]}); rerun the same `usp-fast sample` command (any number of GPUs) to make them, "
                        "or first copy every node's shards/ files into this folder")


def merge_shards(out_dir):
    """<out_dir>/shards/ (all batches of its plan.json) -> <out_dir>/samples.npz, streamed through samples.npy so
    that no more than one batch is in memory; the shards are deleted once the .npz is in place. -> the .npz path."""
    out = Path(out_dir)
    shards = out / "shards"
    if not (shards / "plan.json").is_file():
        raise UserError(f"{shards}/plan.json not found: {out} holds no sampling shards to merge")
    plan = json.loads((shards / "plan.json").read_text())
    check_shards(shards, plan)
    npy, b = out / "samples.npy", plan["batch"]
    images = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8,
                                       shape=(plan["num_images"], plan["image_size"], plan["image_size"], 3))
    for k in range(num_batches(plan)):
        images[k * b:(k + 1) * b] = np.load(shard_path(shards, k))
    images.flush()
    del images
    npy_to_npz(npy, out / "samples.npz")
    npy.unlink()
    shutil.rmtree(shards)
    return out / "samples.npz"


class Sampler:
    """Everything one sampling job needs; `run` drives it. The steps are separate so that tests can play several
    ranks in one process: open_output (rank 0), fill (every rank), finalize (rank 0)."""

    def __init__(self, cfg, device="cpu"):
        from usp_fast.vae import LatentNorm, load_vae

        self.cfg, self.scfg = cfg, cfg.sample
        if self.scfg.precision not in ("fp32", "bf16"):
            raise UserError(f"sample.precision {self.scfg.precision!r}: expected fp32 or bf16")
        self.device = torch.device(device)
        self.ckpt = find_checkpoint(cfg)
        self.model, self.meta = load_generator(self.ckpt, self.scfg.ema)
        self.model.to(self.device)
        self.method = DEFAULT_METHOD[self.meta["objective"]] if self.scfg.method == "auto" else self.scfg.method
        self.objective = create_objective(self.meta["objective"], self.model.cfg.learn_sigma)
        self.vae = load_vae(cfg.vae.name, cfg.vae.scale, device=self.device)
        trained = self.meta.get("vae") or {}
        if trained.get("fingerprint") and self.vae.identity["fingerprint"] != trained["fingerprint"]:
            raise UserError(f"vae.name={cfg.vae.name} (fingerprint {self.vae.identity['fingerprint']}) is not the VAE "
                            f"this model was trained on: set vae.name={trained.get('name')} (fingerprint "
                            f"{trained['fingerprint']})")
        self.latent_norm = LatentNorm.of(self.meta)  # undone before decoding
        self.x0_range = denoised_range(self.scfg, self.objective, self.vae, self.latent_norm)
        self.side = self.meta["latent_size"] * self.vae.downsample
        s = self.scfg
        tag = (f"{self.ckpt.name}-{'ema' if s.ema else 'raw'}-{self.method}{s.steps}-cfg{s.cfg_scale:g}"
               f"{'' if s.cfg_channels is None else f'c{s.cfg_channels}'}-seed{s.seed}"
               f"{'-classes' if s.classes else ''}")
        self.out = Path(s.out_dir) if s.out_dir else Path(cfg.run.out_dir) / cfg.run.name / "samples" / tag
        self.shards = self.out / "shards"
        # everything the images depend on (a resumed run must not mix two), as JSON reads it back
        self.plan = json.loads(json.dumps({
            "checkpoint": str(self.ckpt), "step": self.meta.get("step"),
            "vae": {k: self.vae.identity[k] for k in ("name", "scale", "fingerprint")},
            "method": self.method, "steps": s.steps, "sampler_options": sampler_options(s, self.method),
            "cfg_scale": s.cfg_scale, "cfg_channels": s.cfg_channels, "ema": s.ema, "seed": s.seed,
            "classes": list(s.classes) or None, "num_images": s.num_images, "batch": s.batch,
            "image_size": self.side, "precision": s.precision, "clip_denoised": self.x0_range is not None}))

    @property
    def num_batches(self):
        return num_batches(self.plan)

    def finished(self):
        """Rank 0: the result of an earlier run of these same samples that finished (samples.npz with its
        samples.json and no shards left), else None. A finished folder of other samples is refused in one line."""
        npz, info = self.out / "samples.npz", self.out / "samples.json"
        if self.shards.exists() or not (npz.is_file() and info.is_file()):
            return None
        old = json.loads(info.read_text())
        diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in self.plan.items() if old.get(k) != v]
        if diff:
            raise UserError(f"sample.out_dir {self.out} holds finished samples of other settings ({'; '.join(diff)}): "
                            f"choose another sample.out_dir, or delete {npz} to sample again")
        log.info("%s already holds these %d samples (samples.json matches): nothing to do", self.out,
                 self.scfg.num_images)
        result = {"npz": str(npz)}
        if (self.out / "grid.png").is_file():
            result["grid"] = str(self.out / "grid.png")
        return result

    def open_output(self):
        """Rank 0, before any fill: record the plan in shards/plan.json, or refuse one that differs from it."""
        self.shards.mkdir(parents=True, exist_ok=True)
        path = self.shards / "plan.json"
        if path.is_file():
            old = json.loads(path.read_text())
            diff = [f"{k} {old.get(k)!r} -> {self.plan.get(k)!r}" for k in sorted(old.keys() | self.plan.keys())
                    if old.get(k) != self.plan.get(k)]
            if diff:
                raise UserError(f"sample.out_dir {self.out} holds the shards of other samples ({'; '.join(diff)}): "
                                f"choose another sample.out_dir, or delete {self.shards} to start over")
        else:
            atomic_write_text(path, json.dumps(self.plan, indent=1))
        done = self.num_batches - len(missing_batches(self.shards, self.plan))
        log.info("sampling %d images (%s, %s %d steps, cfg %g, %s weights, seed %d) from %s into %s: %d of %d "
                 "batches already done", self.scfg.num_images, self.meta["model"], self.method, self.scfg.steps,
                 self.scfg.cfg_scale, "EMA" if self.scfg.ema else "raw", self.scfg.seed, self.ckpt, self.out, done,
                 self.num_batches)

    def fill(self, rank=0, world=1):
        """Make those of global batches rank, rank + world, ... that have no complete shard yet."""
        from usp_fast.progress import progress_bar

        self.shards.mkdir(parents=True, exist_ok=True)  # a node without the shared filesystem keeps its own
        todo = [k for k in range(rank, self.num_batches, world)
                if not shard_complete(shard_path(self.shards, k), batch_shape(self.plan, k))]
        for k in progress_bar(todo, desc="sample", unit="batch", disable=rank != 0):
            latents, _ = sample_latents(self.model, self.objective, self.scfg, self.method, k,
                                        batch_shape(self.plan, k)[0], self.device, self.x0_range)
            images = to_uint8(self.vae.decode(self.latent_norm.denormalize(latents)))
            with atomic_path(shard_path(self.shards, k)) as tmp, open(tmp, "wb") as f:
                np.save(f, images)

    def finalize(self, world=1):
        """Rank 0, after every fill: grid.png and samples.json from the shards, then merge_shards (last, so that a
        run killed in here finds its shards again and only merges)."""
        check_shards(self.shards, self.plan)
        s = self.scfg
        result = {"npz": str(self.out / "samples.npz")}
        n = min(s.grid, s.num_images)
        if n:
            images = np.concatenate([np.load(shard_path(self.shards, k)) for k in range(math.ceil(n / s.batch))])[:n]
            if s.classes:  # one class per row, labelled with its name
                cols = classes_per_row(s)
                names = self.meta.get("class_names") or []
                rows = [fixed_class(s, r * cols) for r in range((len(images) + cols - 1) // cols)]
                labels = [f"{c}: {names[c]}" if c < len(names) else str(c) for c in rows]
                grid = image_grid(images, cols=cols, row_labels=labels)
            else:
                grid = image_grid(images)
            result["grid"] = str(save_png(grid, self.out / "grid.png"))
        info = {**self.plan, "model": self.meta["model"], "world_size": world}
        atomic_write_text(self.out / "samples.json", json.dumps(info, indent=1))
        merge_shards(self.out)
        log.info("wrote %s", ", ".join(result.values()))
        return result


def run(cfg, device="cpu", rank=0, world=1):
    """Generate cfg.sample.num_images images on this rank of `world` -> dict of output paths (rank 0). Resumes the
    batches already in sample.out_dir/shards/; with all of them there it only merges."""
    device = torch.device(device)
    if device.type == "cuda":  # fp32 sampling with TF32 matmuls, as DiT's sampler
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sampler = Sampler(cfg, device)
    done = dist.broadcast_from_main(sampler.finished() if rank == 0 else None)
    if done is not None:  # the same command again after it finished: keep what is there
        return done if rank == 0 else {}
    if rank == 0:
        sampler.open_output()
    dist.barrier()
    sampler.fill(rank, world)
    dist.barrier()
    result = sampler.finalize(world) if rank == 0 else {}
    dist.barrier()
    return result
