"""`usp-fast demo` (what `make demo` runs): the whole chain on the built-in demo in a few minutes on CPU, then a
summary with the path of every picture and file.

demo photos -> latent cache -> USP pretraining -> restoration pictures -> DiT training from the USP encoder ->
a sample grid with fixed classes -> the DiT's one-step denoising of demo photos -> FID against the demo photos. The autoencoder is `vae.name: pixels:4`
(weight-free, exactly invertible; NOT a learned VAE), so the pictures show real image content without any
downloaded weights. Every step reuses what an earlier run left: a second `make demo` only prints the summary.
Configs: configs/pretrain/demo.yaml and configs/generate/demo.yaml, run from the repo root.
"""
import json
import time
from pathlib import Path

from .errors import UserError

PRETRAIN = "configs/pretrain/demo.yaml"
GENERATE = "configs/generate/demo.yaml"


def _step(name, done, fn, timings):
    if done():
        timings[name] = "reused"
        return
    t0 = time.time()
    fn()
    timings[name] = f"{time.time() - t0:.0f} s"


def _split_overrides(overrides):
    """key=value overrides -> (those the pretrain config has, those the generate config has); a key neither has
    is an error."""
    from .config import ConfigError, describe_keys, parse_override

    keys = {stage: {k for k, *_ in describe_keys(stage)} for stage in ("pretrain", "generate")}
    split = {"pretrain": [], "generate": []}
    for item in overrides:
        key = ".".join(parse_override(item)[0])
        stages = [s for s in split if key in keys[s]]
        if not stages:
            raise ConfigError(f"demo override {item!r}: neither demo config has the key {key!r}")
        for s in stages:
            split[s].append(item)
    return split["pretrain"], split["generate"]


def run_demo(overrides=()):
    """-> {what: path} of every file the demo made (also printed)."""
    from .artifacts import run_dir
    from .cli import main
    from .config import load_config
    from .data.cache import default_cache_dir
    from .evaluation import default_out, evaluate_samples
    from .restoration import restore_folder
    from .sampling import Sampler, denoise_picture
    from .sampling import run as sample_run

    for path in (PRETRAIN, GENERATE):
        if not Path(path).is_file():
            raise UserError(f"demo: {path} not found: run `usp-fast demo` (or `make demo`) from the repo root")
    pre_over, gen_over = _split_overrides(overrides)
    pre = load_config(PRETRAIN, pre_over, stage="pretrain")
    pre_dir = run_dir(pre.run)
    export = pre_dir / "export"
    if not any(o.startswith("generate.init=") for o in gen_over):  # the DiT starts from this pretrain run
        gen_over = [*gen_over, f"generate.init=usp:{export}"]
    gen = load_config(GENERATE, gen_over, stage="generate")
    gen_dir = run_dir(gen.run)
    restoration = pre_dir / "restore_mask0.75.png"
    timings, start = {}, time.time()

    _step("pretrain", lambda: (export / "encoder.json").is_file(),
          lambda: main(["train", "--stage", "pretrain", "--config", PRETRAIN, "--resume", "auto", *pre_over]),
          timings)
    _step("restoration", restoration.is_file,
          lambda: restore_folder(pre_dir, Path(pre.data.root) / "train", num=6, out=restoration, device="cpu"),
          timings)
    _step("generate", lambda: (gen_dir / "generator" / "generator.json").is_file(),
          lambda: main(["train", "--stage", "generate", "--config", GENERATE, "--resume", "auto", *gen_over]),
          timings)
    samples_dir = gen_dir / "samples" / "demo"  # a fixed folder, so a rerun finds them
    gen.sample.out_dir = str(samples_dir)
    npz = samples_dir / "samples.npz"
    _step("sample", npz.is_file, lambda: sample_run(gen, "cpu"), timings)
    denoising = gen_dir / "denoise.png"
    _step("denoising", denoising.is_file,
          lambda: denoise_picture(Sampler(gen, "cpu"), Path(gen.data.root) / "train", denoising), timings)
    reference = gen_dir / f"reference_{gen.data.resolution}.npz"
    _step("reference", reference.is_file, lambda: _write_reference(Path(gen.data.root) / "train",
                                                                     gen.data.resolution, reference), timings)
    evaluation = default_out(npz)
    _step("evaluate", evaluation.is_file, lambda: evaluate_samples(npz, reference, device="cpu"), timings)
    fid = json.loads(evaluation.read_text())["metrics"]["fid"]
    files = {
        "demo photos": Path(pre.data.root) / "train",
        "latent cache": default_cache_dir(pre),
        "pretrain run": pre_dir, "pretrain loss curve": pre_dir / "loss.png", "encoder export": export,
        "restoration pictures": restoration,
        "generate run": gen_dir, "generate loss curve": gen_dir / "loss.png", "generator": gen_dir / "generator",
        "denoising pictures": denoising, "sample grid": samples_dir / "grid.png", "samples (ADM .npz)": npz, "FID reference": reference,
        "evaluation": evaluation,
    }
    print(f"\nusp-fast demo: the whole chain in {time.time() - start:.0f} s "
          f"({', '.join(f'{k} {v}' for k, v in timings.items())})")
    print(f"  autoencoder: {pre.vae.name} (weight-free space-to-depth, NOT a learned VAE: pictures show real content)")
    for what, path in files.items():
        print(f"  {what + ':':<24} {path}")
    print(f"  FID of {gen.sample.num_images} samples against the {pre.data.demo_images} demo photos: {fid:.1f} "
          "(tiny sample count: a smoke number, not a benchmark)")
    print("  the restorations show the photos, and so do the DiT's one-step estimates from low noise (denoise.png); "
          "the samples, which start from pure noise, do not yet (a few CPU minutes of pixel-space DiT training: see "
          "the README)")
    return {k: str(v) for k, v in files.items()} | {"fid": fid, "timings": timings}



def _write_reference(folder, resolution, out):
    """The demo photos as the generator sees them (ADM centre crop at its resolution) -> an ADM-format .npz."""
    import numpy as np

    from .data.images import IMAGE_EXTENSIONS
    from .io import atomic_path
    from .pictures import to_uint8
    from .restoration import load_images

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    images = np.concatenate([to_uint8(load_images(paths[i:i + 64], resolution)) for i in range(0, len(paths), 64)])
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images)
