"""Does a USP encoder help segmentation? USP-initialised against random-init encoder under UperNet, at equal steps,
on CPU, on the mosaic set made from real clothing photos (usp_fast/data/mosaic.py, docs/segmentation.md).

  1. the mosaic set: training mosaics from clothing-256 train/ photos, validation mosaics from validation/ photos
     (10 classes, 256 px; no photo is in both splits);
  2. the encoder: usp_vit_tiny pretrained by --stage pretrain on the 1,000 ImageNet samples through TAEF2
     (configs/pretrain/taef2_imagenet_samples_128.yaml), unless its export already exists;
  3. --stage segment for each arm (usp: segment.init=usp:<export>; random: the same architecture and sin-cos
     position table, random weights) and seed: same data, views, steps, lr schedule and heads; the seed sets the
     heads' init (and the random arm's encoder), the data order, which cached view each step reads, drop path;
  4. single-scale sliding-window mIoU on the validation mosaics; per arm the mean over seeds with a 95% Student-t
     interval, and the paired difference usp - random (paired by seed) with its 95% t-interval.

    python -m usp_fast_benchmarks.segment_cpu [--seeds 0 1 2] [--steps 250] [--work runs/segment-cpu]

A rerun continues: finished runs (segment.json present) are read, not repeated. Writes
benchmarks/results/segment-cpu-x86-64.json and
-table.md (the discussion is benchmarks/results/segment-cpu-x86-64.md). Set OMP_NUM_THREADS=1 on a shared machine (each run is one
process; OpenMP spinning on oversubscribed cores made steps 5-12x slower here).
"""
import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from usp_fast.io import atomic_write_text

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "configs" / "pretrain" / "taef2_imagenet_samples_128.yaml"
DEMO = ROOT / "configs" / "segment" / "demo.yaml"
ARMS = ("usp", "random")


def t_interval(values, level=0.95):
    """Mean and Student-t interval of the mean of `values` (n >= 2) -> (mean, low, high)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def segment_overrides(work, shared, export, arm, seed, steps, batch):
    init = f"usp:{export}" if arm == "usp" else "random"
    return [f"run.out_dir={work}", f"run.name={arm}_s{seed}", f"run.seed={seed}",
            f"data.root={work / 'mosaics'}", "segment.demo_images=0", f"segment.init={init}",
            f"vae.name={shared / 'weights' / 'taef2'}", "vae.scale=1.0", "vae.normalize=channel",
            "model.name=usp_vit_tiny", "segment.views=4", f"segment.cache_dir={work / 'views'}",
            f"train.max_steps={steps}", f"train.global_batch={batch}", f"train.micro_batch={batch}",
            f"train.ckpt_every={steps}", "train.log_every=25", "segment.pictures=4",
            # smaller heads than the demo's: the stride-4 UPerNet levels dominate a CPU step
            "segment.head_channels=64", "segment.aux_channels=32"]


def run_arm(work, shared, export, arm, seed, steps, batch):
    from usp_fast.stages import run_stage

    rdir = work / f"{arm}_s{seed}"
    if not (rdir / "segment.json").is_file():
        t0 = time.time()
        resume = "auto" if (rdir / "checkpoints").is_dir() else None
        run_stage("segment", str(DEMO), segment_overrides(work, shared, export, arm, seed, steps, batch),
                  resume=resume)
        log.info("%s seed %d: %.0f s", arm, seed, time.time() - t0)
    return json.loads((rdir / "segment.json").read_text())


def report(results, meta):
    per_arm = {arm: [results[(arm, s)]["mIoU"] for s in meta["seeds"]] for arm in ARMS}
    diffs = [results[("usp", s)]["mIoU"] - results[("random", s)]["mIoU"] for s in meta["seeds"]]
    doc = {**meta, "runs": {f"{a}_s{s}": {k: results[(a, s)][k] for k in ("mIoU", "aAcc", "mAcc")}
                            | {"per_class_iou": {n: c["iou"] for n, c in results[(a, s)]["per_class"].items()}}
                            for a, s in results},
           "arms": {}, "difference_usp_minus_random": {}}
    for arm, vals in per_arm.items():
        m, lo, hi = t_interval(vals)
        doc["arms"][arm] = {"mIoU_per_seed": vals, "mIoU_mean": m, "mIoU_95ci": [lo, hi],
                            "aAcc_mean": float(np.mean([results[(arm, s)]["aAcc"] for s in meta["seeds"]]))}
    m, lo, hi = t_interval(diffs)
    doc["difference_usp_minus_random"] = {"per_seed": diffs, "mean": m, "95ci": [lo, hi],
                                          "interval": "Student t over seeds, paired by seed"}
    return doc


def table(doc):
    lines = ["| arm | mIoU (%) mean [95% t-interval] | per seed | aAcc (%) |", "| --- | --- | --- | --- |"]
    for arm, a in doc["arms"].items():
        lo, hi = a["mIoU_95ci"]
        lines.append(f"| {arm} | {a['mIoU_mean']:.2f} [{lo:.2f}, {hi:.2f}] | "
                     f"{' / '.join(f'{v:.2f}' for v in a['mIoU_per_seed'])} | {a['aAcc_mean']:.2f} |")
    d = doc["difference_usp_minus_random"]
    lines.append(f"| usp - random (paired) | {d['mean']:+.2f} [{d['95ci'][0]:+.2f}, {d['95ci'][1]:+.2f}] | "
                 f"{' / '.join(f'{v:+.2f}' for v in d['per_seed'])} | |")
    return "\n".join(lines)


def main(argv=None):
    from usp_fast.data.mosaic import make_mosaic_set
    from usp_fast.stages import run_stage
    from usp_fast_benchmarks.env import git_commit, utc_now

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--work", default=str(ROOT / "runs" / "segment-cpu"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-images", type=int, default=160)
    p.add_argument("--val-images", type=int, default=40)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shared, work = Path(args.shared).resolve(), Path(args.work).resolve()
    clothing = shared / "data" / "clothing-256"
    if not (clothing / "train").is_dir() or not (shared / "weights" / "taef2").is_dir():
        print(f"skipped: {shared} lacks data/clothing-256 or weights/taef2 (see ../shared/README.md)")
        return 0
    t0 = time.time()
    make_mosaic_set(work / "mosaics", clothing, args.train_images, args.val_images, size=256, seed=0, per_class=40)
    export = work / "pretrain_taef2_128" / "export"
    if not (export / "encoder.json").is_file():
        run_stage("pretrain", str(PRETRAIN), [f"run.out_dir={work}", f"data.root={shared / 'data' / 'imagenet-samples-256'}",
                                              f"data.cache_dir={work / 'latents_128_taef2'}",
                                              f"vae.name={shared / 'weights' / 'taef2'}"])
    results = {}
    for seed in args.seeds:
        for arm in ARMS:
            results[(arm, seed)] = run_arm(work, shared, export, arm, seed, args.steps, args.batch)
    encoder = json.loads((export / "encoder.json").read_text())
    meta = {"what": "USP-initialised vs random-init usp_vit_tiny under UperNet, equal steps, mosaic set of real "
                    "clothing photos (10 classes), TAEF2 latents, single-scale sliding-window mIoU",
            "commit": git_commit(), "date": utc_now(), "seeds": args.seeds, "steps": args.steps,
            "batch": args.batch, "train_images": args.train_images, "val_images": args.val_images,
            "crop_px": 128, "encoder": {"export": str(export.relative_to(work)), "step": encoder.get("step"),
                                        "model": encoder.get("model")},
            "command": "OMP_NUM_THREADS=1 python -m usp_fast_benchmarks.segment_cpu " + " ".join(sys.argv[1:]),
            "base_config": str(DEMO.relative_to(ROOT)), "pretrain_config": str(PRETRAIN.relative_to(ROOT)),
            "overrides_example": segment_overrides(Path("<work>"), Path("<shared>"), Path("<export>"), "usp", 0,
                                                   args.steps, args.batch),
            "wall_s": round(time.time() - t0)}
    doc = report(results, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "segment-cpu-x86-64.json", json.dumps(doc, indent=1))
    atomic_write_text(out / "segment-cpu-x86-64-table.md", table(doc) + "\n")
    print(table(doc))
    return doc


if __name__ == "__main__":
    main()
