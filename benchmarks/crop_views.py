"""What the cheaper cached path costs in encoder quality: USP pretraining on fresh crops (the official online path)
against a latent cache of 1, 4 or 16 stored crops per image, then a linear probe of each encoder.

Every arm pretrains the same encoder for the same steps, batch, lr and seed on the same clothing-256 train images
through the real TAEF2 autoencoder (../shared), and differs only in where its crops come from:
  online      decode + RandomResizedCrop(0.2-1, bicubic) + flip + encode every step (data.source=online)
  cache_vN    a latent cache of N stored views per image (view 0 the centre crop, N-1 RandomResizedCrops, each
              with its flip; training draws one view per image per epoch)
The probe (LARS on the frozen cls token, as MAE) trains on the centre crops of a class-balanced train subset and
is scored on the validation + test splits together. Each seed (`--seeds`) repeats the whole experiment: its own
stored crops, encoder init, data order and masks. Differences against `online` come with a paired bootstrap 90%
interval over seeds and scored images (the same images score every arm, and each seed pairs its own arms).

    python -m usp_fast_benchmarks.crop_views [--seeds 0 1] [--steps N] [--images-per-class K] [--out DIR]

A rerun continues: finished caches, encoders and probes in the work folder (one subfolder per seed) are reused.
"""
import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from usp_fast.io import atomic_write_text

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
ARMS = {"online": None, "cache_v1": 0, "cache_v4": 3, "cache_v16": 15}  # arm -> cache.views (extra crops)


def write_list(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(f"{p} {label}\n" for p, label in items))


class Experiment:
    def __init__(self, shared, work, steps, per_class, probe_per_class, resolution, batch, seed):
        self.shared, self.work = Path(shared), Path(work)
        self.steps, self.per_class, self.res, self.batch, self.seed = steps, per_class, resolution, batch, seed
        self.probe_per_class = probe_per_class
        self.vae = self.shared / "weights" / "taef2"
        self.clothing = self.shared / "data" / "clothing-256"

    def lists(self):
        from usp_fast.data.images import list_images

        out = {}
        train, _ = list_images(self.clothing / "train")

        def first(k):  # a class-balanced subset: the first k images of each class
            per = {}
            return [it for it in train if per.setdefault(it[1], []).append(it) or len(per[it[1]]) <= k]

        held_out = list_images(self.clothing / "validation")[0] + list_images(self.clothing / "test")[0]
        for name, items in (("pretrain", first(self.per_class)), ("probe_train", first(self.probe_per_class)),
                            ("probe_eval", held_out)):
            out[name] = self.work / "lists" / f"{name}.txt"
            if not out[name].is_file():
                write_list(out[name], items)
        return out

    def base(self, name, file_list, cache_key, views=0):
        return {"run": {"name": name, "out_dir": str(self.work), "seed": self.seed},
                "data": {"file_list": str(file_list), "resolution": self.res, "num_workers": 2,
                         "sample_posterior": False, "flip": True, "crop_scale": [0.2, 1.0],
                         "cache_dir": str(self.work / "cache" / cache_key)},
                "vae": {"name": str(self.vae), "scale": 1.0, "encode_batch": 32, "normalize": "none"},
                "cache": {"views": views, "shard_size": 1024}}

    def cache(self, name, file_list, views):
        from usp_fast.stages import run_stage

        key = f"{name}_{self.res}_v{views}"
        cfg = self.base(f"cache_{key}", file_list, key, views)
        if not (self.work / "cache" / key / "manifest.json").is_file():
            t0 = time.time()
            run_stage("cache", cfg)
            log.info("cache %s: %.0f s", key, time.time() - t0)
        return cfg

    def pretrain(self, arm, lists):
        from usp_fast.stages import run_stage

        export = self.work / f"pretrain_{arm}" / "export"
        if (export / "encoder.json").is_file():
            return export, json.loads((self.work / f"pretrain_{arm}" / "timing.json").read_text())
        views = ARMS[arm]
        if views is None:
            cfg = self.base(f"pretrain_{arm}", lists["pretrain"], "unused")
            cfg["data"] |= {"source": "online", "crop": "rrc", "decoder": "pil", "prefetch": 2}
            encode_images = 0
        else:
            cfg = self.cache("pretrain", lists["pretrain"], views)
            cfg["run"]["name"] = f"pretrain_{arm}"
            encode_images = None
        cfg |= {"model": {"name": "usp_vit_tiny", "mlp_act": "gelu"},
                "optim": {"lr": 1.5e-3, "warmup_steps": max(self.steps // 10, 1), "weight_decay": 0.05,
                          "betas": [0.9, 0.95], "schedule": "cosine"},
                "train": {"epochs": 1e6, "max_steps": self.steps, "drop_last": True, "global_batch": self.batch,
                          "micro_batch": self.batch, "log_every": max(self.steps // 20, 1),
                          "ckpt_every": self.steps, "keep_last": 1, "zero_stage": 0}}
        t0 = time.time()
        run_stage("pretrain", cfg, resume="auto")
        timing = {"pretrain_seconds": round(time.time() - t0, 1), "encoded_in_training": encode_images}
        atomic_write_text(self.work / f"pretrain_{arm}" / "timing.json", json.dumps(timing))
        return export, timing

    def probe(self, arm, export, lists):
        from usp_fast.stages import run_stage

        out = self.work / f"probe_{arm}" / "probe.json"
        if not out.is_file():
            cfg = self.cache("probe_train", lists["probe_train"], 0)
            ev = self.cache("probe_eval", lists["probe_eval"], 0)
            cfg["run"]["name"] = f"probe_{arm}"
            cfg |= {"probe": {"encoder": str(export), "pool": "cls", "feature_batch": 128,
                              "val_cache_dir": ev["data"]["cache_dir"]},
                    "optim": {"lr": 6.4, "weight_decay": 0.0, "warmup_epochs": 10},
                    "train": {"epochs": 90, "global_batch": 256, "micro_batch": 256, "log_every": 10}}
            run_stage("probe", cfg)
        return json.loads(out.read_text())

    def run(self):
        lists = self.lists()
        arms = {}
        for arm in ARMS:
            t0 = time.time()
            export, timing = self.pretrain(arm, lists)
            probe = self.probe(arm, export, lists)
            acc = probe["accuracy"]["final"]
            arms[arm] = {"views": None if ARMS[arm] is None else ARMS[arm] + 1, "top1": acc["top1"],
                         "top5": acc["top5"], "correct": acc["correct"], **timing}
            log.info("%s: probe top-1 %.2f%% (%.0f s)", arm, acc["top1"], time.time() - t0)
        return arms


def paired_interval(a, b, rounds=2000, seed=0, level=0.9):
    """Top-1 difference b - a (percentage points) of two arms scored per seed and image (arrays [seeds, images] of
    1/0), with a paired bootstrap interval: resample the seeds, then the images, the same draws for both arms."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    rng = np.random.default_rng(seed)
    diffs = np.empty(rounds)
    for r in range(rounds):
        seeds = rng.integers(0, a.shape[0], a.shape[0])
        images = rng.integers(0, a.shape[1], a.shape[1])
        diffs[r] = 100 * (b[seeds][:, images].mean() - a[seeds][:, images].mean())
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return 100 * float(b.mean() - a.mean()), [float(lo), float(hi)]


def binomial_interval(correct, level=0.9):
    """Wilson interval of a top-1 accuracy (percent)."""
    from statistics import NormalDist

    k, n = float(np.sum(correct)), len(correct)
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [100 * (centre - half), 100 * (centre + half)]


def report(per_seed, meta):
    """per_seed: {seed: {arm: result}} -> the results document: per arm the top-1 of every seed, their mean with a
    binomial interval over all scored images, and the paired difference against online."""
    seeds = sorted(per_seed)
    doc = {**meta, "seeds": seeds, "arms": {}}
    for arm in per_seed[seeds[0]]:
        runs = [per_seed[k][arm] for k in seeds]
        correct = np.array([r["correct"] for r in runs])
        entry = {"views": runs[0]["views"], "top1": float(100 * correct.mean()),
                 "top1_per_seed": [r["top1"] for r in runs], "top5_per_seed": [r["top5"] for r in runs],
                 "top1_ci90": binomial_interval(correct.ravel()),
                 "pretrain_seconds_per_seed": [r["pretrain_seconds"] for r in runs]}
        if arm != "online":
            online = np.array([per_seed[k]["online"]["correct"] for k in seeds])
            entry["vs_online_pp"], entry["vs_online_ci90"] = paired_interval(online, correct)
        doc["arms"][arm] = entry
    return doc


def table(doc):
    seeds = ", ".join(map(str, doc["seeds"]))
    lines = [f"| arm | stored views | probe top-1 (%), mean of seeds {seeds} [90% CI] | per seed | "
             "vs online (pp) [paired 90% CI] |", "| --- | --- | --- | --- | --- |"]
    for arm, r in doc["arms"].items():
        lo, hi = r["top1_ci90"]
        vs = "-" if arm == "online" else f"{r['vs_online_pp']:+.1f} [{r['vs_online_ci90'][0]:+.1f}, " \
                                         f"{r['vs_online_ci90'][1]:+.1f}]"
        views = "fresh every step" if r["views"] is None else r["views"]
        each = " / ".join(f"{v:.1f}" for v in r["top1_per_seed"])
        lines.append(f"| {arm} | {views} | {r['top1']:.1f} [{lo:.1f}, {hi:.1f}] | {each} | {vs} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--work", default=str(ROOT / "runs" / "crop-views"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--images-per-class", type=int, default=30, help="pretraining images per class")
    p.add_argument("--probe-per-class", type=int, default=100, help="probe training images per class")
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exps = {k: Experiment(a.shared, Path(a.work) / f"seed{k}", a.steps, a.images_per_class, a.probe_per_class,
                          a.resolution, a.batch, k) for k in a.seeds}
    probe = next(iter(exps.values()))
    if not (probe.vae / "taef2_encoder.pth").is_file() or not probe.clothing.is_dir():
        print(f"skipped: {probe.shared} has no TAEF2 weights or clothing-256 (see ../shared/README.md)")
        return None
    t0 = time.time()
    per_seed = {k: e.run() for k, e in exps.items()}
    from usp_fast_benchmarks.env import device_name, git_commit

    meta = {"experiment": "crop_views", "device": device_name(torch.device("cpu")), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d"), "steps": a.steps, "batch": a.batch,
            "resolution": a.resolution, "pretrain_images": 10 * a.images_per_class,
            "probe_train_images": 10 * a.probe_per_class, "encoder": "usp_vit_tiny",
            "vae": "TAEF2 (../shared/weights/taef2)", "probe": "LARS, 90 epochs, cls token, centre crops",
            "scored_on": "clothing-256 validation + test", "wall_seconds": round(time.time() - t0, 1),
            "command": "python -m usp_fast_benchmarks.crop_views " + " ".join(argv or [])}
    doc = report(per_seed, meta)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "crop-views.json", json.dumps(doc, indent=1))
    atomic_write_text(out / "crop-views.md", table(doc) + "\n")
    print(table(doc))
    return doc


if __name__ == "__main__":
    main()
