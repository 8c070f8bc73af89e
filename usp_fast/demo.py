"""`usp-fast demo` (what `make demo` runs): the whole chain on built-in data in a few minutes on CPU, then a
summary with the path of every picture and file. docs/demo.md says what the pictures show and how long it takes.

demo photos -> latent cache -> USP pretraining -> restoration pictures -> a SiT trained from the USP encoder on
handwritten digits -> a sample grid, one row per digit -> the SiT's one-step denoising of real digits -> how often
a sample is nearest its own digit's mean -> FID against the digits. Two data sets, both shipped inside installed
packages: scikit-image's photographs for pretraining (the restorations show photos) and scikit-learn's
handwritten digits for generation (what a CPU-trained pixel-space generator can learn to draw in minutes). The
autoencoder is `vae.name: pixels:2` (weight-free, exactly invertible; NOT a learned VAE), so the pictures show
real image content without any downloaded weights. Every step reuses what an earlier run left: a second
`make demo` only prints the summary. Configs: configs/pretrain/demo.yaml and configs/generate/demo.yaml, run from
the repo root.
"""
import json
import time
from pathlib import Path

import numpy as np

from .errors import UserError

PRETRAIN = "configs/pretrain/demo.yaml"
GENERATE = "configs/generate/demo.yaml"
REFERENCE_IMAGES = 200  # FID reference: this many real images, evenly spread over the sorted (class) folders


def _step(name, done, fn, timings):
    if done():
        timings[name] = "reused"
        return
    t0 = time.time()
    fn()
    timings[name] = f"{time.time() - t0:.0f} s"


def _split_overrides(overrides):
    """key=value overrides -> (those for the pretrain config, those for the generate config). A plain key goes to
    every demo config that has it (both have run.*, data.*, train.* ...); `pretrain:key=value` or
    `generate:key=value` to that one only (e.g. the two data roots). A key no demo config has is an error."""
    from .config import ConfigError, parse_override
    from .stages import describe_keys

    keys = {stage: {k for k, *_ in describe_keys(stage)} for stage in ("pretrain", "generate")}
    split = {"pretrain": [], "generate": []}
    for given in overrides:
        stage, sep, rest = given.partition(":")
        only = stage if sep and "=" not in stage else None
        if only is not None and only not in split:
            raise ConfigError(f"demo override {given!r}: {only!r} is not a demo stage (pretrain or generate)")
        item = rest if only else given
        key = ".".join(parse_override(item)[0])
        stages = [s for s in ([only] if only else split) if key in keys[s]]
        if not stages:
            raise ConfigError(f"demo override {given!r}: " + (f"the {only} demo config has no key {key!r}" if only
                              else f"neither demo config has the key {key!r}"))
        for s in stages:
            split[s].append(item)
    return split["pretrain"], split["generate"]


def class_means(folder, resolution):
    """An ImageFolder's images as the generator sees them (ADM centre crop at `resolution`), grey -> float
    [num_classes, H, W]: the mean picture of each class, classes in sorted folder order (the label order)."""
    import torch

    from .data.images import image_files, load_images

    classes = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
    means = []
    for name in classes:
        paths = image_files(Path(folder) / name)
        total = torch.zeros(resolution, resolution, dtype=torch.float64)
        for i in range(0, len(paths), 256):
            total += load_images(paths[i:i + 256], resolution).double().mean(1).sum(0)  # grey = mean of RGB
        means.append((total / len(paths)).float().numpy())
    return np.stack(means)


def nearest_class_mean_match(samples, labels, means):
    """uint8 samples [N, H, W, 3] with their conditioning labels and class means from `class_means` -> the
    fraction of samples whose nearest class mean (mean squared pixel distance, grey) is their own class'. Chance
    is about 1 / num_classes; noise, or one picture for every class, stays near it."""
    grey = np.asarray(samples, dtype=np.float64).mean(-1) / 127.5 - 1  # the [-1, 1] scale of class_means
    dist = ((grey[:, None] - np.asarray(means, dtype=np.float64)[None]) ** 2).mean((-2, -1))
    return float((dist.argmin(1) == np.asarray(labels)).mean())


def sample_labels(scfg, n):
    """The conditioning class of each of `n` samples made with sample.classes (see sampling.fixed_class)."""
    from .sampling import fixed_class

    return [fixed_class(scfg, i) for i in range(n)]


def _write_class_match(npz, gen, folder, out):
    from .io import atomic_write_text

    samples = np.load(npz)["arr_0"]
    labels = sample_labels(gen.sample, len(samples))
    means = class_means(folder, gen.data.resolution)
    match = nearest_class_mean_match(samples, labels, means)
    per_class = {str(c): nearest_class_mean_match(samples[np.asarray(labels) == c], [c] * labels.count(c), means)
                 for c in sorted(set(labels))}
    atomic_write_text(out, json.dumps({"nearest_class_mean": match, "chance": 1 / len(means),
                                       "num_samples": len(samples), "per_class": per_class}, indent=1))


def _enlarged(png, factor):
    """<name>.png -> <name>_x<factor>.png, every pixel a factor x factor block (written once). -> its path."""
    from PIL import Image

    from .pictures import save_png

    out = png.with_name(f"{png.stem}_x{factor}.png")
    if png.is_file() and not out.is_file():
        a = np.asarray(Image.open(png).convert("RGB"))
        save_png(a.repeat(factor, 0).repeat(factor, 1), out)
    return out


def run_demo(overrides=()):
    """-> {what: path} of every file the demo made (also printed), "fid", "class_match" and "timings"."""
    from .artifacts import run_dir
    from .data.cache import default_cache_dir
    from .evaluation import default_out, evaluate_samples
    from .restoration import restore_folder
    from .sampling import Sampler, denoise_picture
    from .sampling import run as sample_run
    from .stages import load_config, run_stage

    for path in (PRETRAIN, GENERATE):
        if not Path(path).is_file():
            raise UserError(f"demo: {path} not found: run `usp-fast demo` (or `make demo`) from the repo root")
    pre_over, gen_over = _split_overrides(overrides)
    pre = load_config(PRETRAIN, pre_over, stage="pretrain")
    pre_dir = run_dir(pre.run)
    export = pre_dir / "export"
    if not any(o.startswith("generate.init=") for o in gen_over):  # the generator starts from this pretrain run
        gen_over = [*gen_over, f"generate.init=usp:{export}"]
    gen = load_config(GENERATE, gen_over, stage="generate")
    gen_dir = run_dir(gen.run)
    photos, digits = Path(pre.data.root) / "train", Path(gen.data.root) / "train"
    restoration = pre_dir / "restore_mask0.75.png"
    timings, start = {}, time.time()

    _step("pretrain", lambda: (export / "encoder.json").is_file(),
          lambda: run_stage("pretrain", PRETRAIN, pre_over, resume="auto", log_to_run=True), timings)
    _step("restoration", restoration.is_file,
          lambda: restore_folder(pre_dir, photos, num=6, out=restoration, device="cpu"), timings)
    _step("generate", lambda: (gen_dir / "generator" / "generator.json").is_file(),
          lambda: run_stage("generate", GENERATE, gen_over, resume="auto", log_to_run=True), timings)
    samples_dir = gen_dir / "samples" / "demo"  # a fixed folder, so a rerun finds them
    gen.sample.out_dir = str(samples_dir)
    npz = samples_dir / "samples.npz"
    _step("sample", npz.is_file, lambda: sample_run(gen, "cpu"), timings)
    denoising = gen_dir / "denoise.png"
    _step("denoising", denoising.is_file, lambda: denoise_picture(Sampler(gen, "cpu"), digits, denoising), timings)
    class_match = samples_dir / "class_match.json"
    _step("class match", class_match.is_file, lambda: _write_class_match(npz, gen, digits, class_match), timings)
    reference = gen_dir / f"reference_{gen.data.resolution}.npz"
    _step("reference", reference.is_file,
          lambda: _write_reference(digits, gen.data.resolution, reference, REFERENCE_IMAGES), timings)
    evaluation = default_out(npz)
    _step("evaluate", evaluation.is_file, lambda: evaluate_samples(npz, reference, device="cpu"), timings)
    fid = json.loads(evaluation.read_text())["metrics"]["fid"]
    match = json.loads(class_match.read_text())
    grid = samples_dir / "grid.png"
    files = {
        "demo photos": photos, "demo digits": digits,
        "latent cache (photos)": default_cache_dir(pre), "latent cache (digits)": default_cache_dir(gen),
        "pretrain run": pre_dir, "pretrain loss curve": pre_dir / "loss.png", "encoder export": export,
        "restoration pictures": restoration, "restorations, x2": _enlarged(restoration, 2),
        "generate run": gen_dir, "generate loss curve": gen_dir / "loss.png", "generator": gen_dir / "generator",
        "sample grid": grid, "sample grid, x4": _enlarged(grid, 4),
        "denoising pictures": denoising, "denoising, x4": _enlarged(denoising, 4),
        "samples (ADM .npz)": npz, "class match": class_match, "FID reference": reference, "evaluation": evaluation,
    }
    n_ref = len(np.load(reference)["arr_0"])
    print(f"\nusp-fast demo: the whole chain in {time.time() - start:.0f} s "
          f"({', '.join(f'{k} {v}' for k, v in timings.items())})")
    print(f"  autoencoder: {pre.vae.name} (weight-free space-to-depth, NOT a learned VAE: pictures show real content)")
    for what, path in files.items():
        print(f"  {what + ':':<24} {path}")
    print(f"  samples nearest their own digit's mean picture: {match['nearest_class_mean']:.0%} of "
          f"{match['num_samples']} (chance {match['chance']:.0%}); the grid's row k is digit k")
    print(f"  FID of {gen.sample.num_images} samples against {n_ref} real digits: {fid:.1f} "
          "(tiny sample count, Inception on 16 px digits: a smoke number, not a benchmark)")
    print("  the restorations show the photos (visible patches exact, masked ones filled in); the samples, which "
          "start from pure noise, show digits: see docs/demo.md for how to read each picture")
    return {k: str(v) for k, v in files.items()} | {"fid": fid, "class_match": match["nearest_class_mean"],
                                                     "timings": timings}


def _write_reference(folder, resolution, out, num=None):
    """Real images as the generator sees them (ADM centre crop at its resolution; `num` of them evenly spread
    over the sorted files, so over the class folders, or all) -> an ADM-format .npz."""
    from .data.images import image_files, load_images
    from .io import atomic_path
    from .pictures import to_uint8

    paths = image_files(folder)
    if num is not None and len(paths) > num:
        paths = [paths[i * len(paths) // num] for i in range(num)]
    images = np.concatenate([to_uint8(load_images(paths[i:i + 64], resolution)) for i in range(0, len(paths), 64)])
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images)
