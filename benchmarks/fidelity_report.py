"""The fidelity experiment's report (phase 6): the results document <out>/fidelity-<device>-<preset>.json, its
summary (how many steps USP init saves, per seed and on the mean curve over seeds, with a 90% interval from a
paired bootstrap over seeds and samples; the paper's orderings of the ablations; the dose-response), the FID, KID
and loss curves, the dose-response, samples and restoration pictures, and the markdown table; then the results
README is refreshed."""
import platform
import shutil
import time

import numpy as np

from usp_fast.artifacts import read_metrics
from usp_fast.io import atomic_write_text
from usp_fast_benchmarks.charts import write_index
from usp_fast_benchmarks.env import device_name, git_commit, slug
from usp_fast_benchmarks.fidelity_eval import FastFID
from usp_fast_benchmarks.fidelity_preset import ARMS, DOSE_PREFIX
from usp_fast_benchmarks.fidelity_runs import read_json, write_json


def write_report(ws, evaluator, arms, evals, probes, wall, out):
    """Every results file of the experiment -> {"results": json path, "goal": {...}, "wall_s": seconds}."""
    doc = results_document(ws, evaluator, arms, evals, probes, wall)
    stem = f"fidelity-{slug(doc['device'])}-{ws.p.name}"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "curves": out / f"{stem}-curves.png",
             "samples": out / f"{stem}-samples.png", "restoration": out / f"{stem}-restoration.png",
             "table": out / f"{stem}-table.md", "dose": out / f"{stem}-dose.png"}
    doc["files"] = {k: str(v.name) for k, v in paths.items()}
    write_json(paths["json"], doc)
    plot_curves(doc, paths["curves"])
    plot_dose(doc, paths["dose"])
    samples_picture(ws, evaluator, doc, paths["samples"])
    restoration_picture(ws, evaluator, paths["restoration"])
    atomic_write_text(paths["table"], table_markdown(doc))
    write_index(out)
    print(table_markdown(doc))
    return {"results": str(paths["json"]), "goal": doc["goal"], "wall_s": doc["wall_s"]}


def results_document(ws, evaluator, arms, evals, probes, wall):
    """The results JSON: the run's environment, the preset, per-phase times, the encoders' pretraining curves, the
    floors, every arm's curves (mean over seeds, with an interval over seeds and samples, and per seed: FID, KID,
    FID_inf, loss, the feature files), the probes, the summary and the goals."""
    from usp_fast_benchmarks.fidelity_runs import encoder_targets

    import torch

    p = ws.p
    doc = {"preset": p.name, "device": device_name(evaluator.device),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **git_commit(), "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "threads": torch.get_num_threads(), "preset_config": p.model_dump(),
           # phases summed over every invocation that worked on this experiment (a resumed run adds its share)
           "wall_s": round(sum(ws.timings.values()), 1), "last_invocation_s": round(wall, 1),
           "phase_s": ws.timings, "eval_steps": p.eval_steps(), "seeds": list(p.seeds),
           "work_dir": str(ws.dir.resolve()), "features_dir": str((ws.dir / "features").resolve()),
           "pretrain": {}, "reference": {}, "arms": {}, "probe": {}}
    for target in encoder_targets(p):
        rows = read_metrics(ws.dir / f"pretrain_{target}")
        doc["pretrain"][target] = {"loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                                   "curve": [[r["step"], r["loss"]] for r in rows]}
    for dataset in p.datasets():
        ref = evaluator.reference(dataset)
        doc["reference"][dataset] = {"real_images": ref["count"], "resolution": p.resolution,
                                     "floors": ref["floors"]}
    by_name = {}
    for arm in arms:
        by_name.setdefault(arm.name, []).append(arm)
    for name, runs in by_name.items():
        doc["arms"][name] = arm_entry(ws, runs, evals)
    doc["bootstrap"] = paired_bootstrap(ws, evaluator, doc)
    for name, a in doc["arms"].items():  # the mean curve's interval: over seeds and samples
        std = doc["bootstrap"].get(_group(a), {}).get(name, {}).get("fid_std")
        if std is not None:
            a["fid_std"] = std
            a["fid_lo"] = [f - Z90 * s for f, s in zip(a["fid"], std)]
            a["fid_hi"] = [f + Z90 * s for f, s in zip(a["fid"], std)]
    doc["probe"] = {k: {"top1": v["accuracy"]["final"]["top1"], "top5": v["accuracy"]["final"]["top5"],
                        "num_train": v["num_train"], "num_eval": v["num_eval"], "split": "clothing test"}
                    for k, v in probes.items()}
    doc["summary"], doc["goal"] = summarize(doc)
    return doc


# ---- every seed of an arm ----

Z90 = 1.6448536269514722  # the normal 90% two-sided quantile


def _group(a):
    return f"{'clothing_' if a['dataset'] == 'clothing' else ''}{a['family'].lower()}"


def arm_entry(ws, runs, evals):
    """One arm's results: per seed (FID with its sample bootstrap interval, KID and its std over subsets, FID_inf,
    loss curve, feature files) and their mean over seeds (the curves the summary compares; its interval is set
    from the paired bootstrap afterwards, here the mean of the seeds' intervals)."""
    steps = ws.p.eval_steps()
    per_seed = {}
    for arm in runs:
        ev = [_normal_interval(evals[arm][str(s)]) for s in steps]
        per_seed[str(arm.seed)] = {
            "run": arm.run_name, "fid": [e["fid"] for e in ev], "fid_lo": [e["lo"] for e in ev],
            "fid_hi": [e["hi"] for e in ev], "kid": [e.get("kid") for e in ev], "kid_std": [e.get("kid_std") for e in ev],
            "fid_inf": [e.get("fid_inf") for e in ev], "features": [e.get("features") for e in ev],
            "loss_curve": [[r["step"], r["loss"]] for r in read_metrics(ws.dir / arm.run_name)]}
    first = runs[0]
    transfer = read_json(ws.dir / first.run_name / "transfer.json")
    return {"dataset": first.dataset, "family": first.family, "arm": first.arm,
            "conditional": first.dataset == "clothing", "seeds": [a.seed for a in runs], "steps": steps,
            **{key: _mean_over_seeds(per_seed, key) for key in ("fid", "fid_lo", "fid_hi", "kid", "kid_std",
                                                                 "fid_inf")},
            "loss_curve": _mean_loss(per_seed), "transfer_notes": (transfer or {}).get("notes"),
            "per_seed": per_seed}


def _mean_over_seeds(per_seed, key):
    """The mean over seeds at each checkpoint (None where a seed lacks the value: an evaluation from before it
    was recorded)."""
    cols = zip(*(v[key] for v in per_seed.values()))
    return [None if any(x is None for x in col) else float(np.mean(col)) for col in cols]


def _mean_loss(per_seed):
    """The training loss averaged over seeds at the logged steps every seed has."""
    by_step = {}
    for v in per_seed.values():
        for step, loss in v["loss_curve"]:
            by_step.setdefault(step, []).append(loss)
    return [[s, float(np.mean(ls))] for s, ls in sorted(by_step.items()) if len(ls) == len(per_seed)]


def paired_bootstrap(ws, evaluator, doc):
    """Resample seeds and samples together -> {group: {arm: {"fid_std", and for a non-scratch arm
    "speedup_ci90", "speedup_unreached", "rounds"}}}. Each round draws one set of sample indices for every
    evaluation (paired: sample i has the same noise in every arm, seed and checkpoint) and, per arm, its seeds with
    replacement; the arm's mean curve over those seeds is compared with scratch's mean curve over the same seeds
    (paired: a seed is the same data order for both). A round where the arm never reaches scratch's final FID
    counts as speed-up 0 (no speed-up), so the interval's low end is conservative. Resampled FIDs sit above the
    full-sample ones (duplicates); both arms alike, so the steps ratio is hardly affected."""
    e, steps = ws.p.eval, doc["eval_steps"]
    rng = np.random.default_rng(e.seed)
    out = {}
    for group in sorted({_group(a) for a in doc["arms"].values()}):
        names = [n for n, a in doc["arms"].items() if _group(a) == group]
        scratch = f"{group}_scratch"
        if scratch not in names or any(f is None for n in names for v in doc["arms"][n]["per_seed"].values()
                                       for f in v["features"]):
            continue
        ref = evaluator.reference(doc["arms"][scratch]["dataset"])
        fast = {(n, seed): [FastFID(np.load(ws.dir / f)["features"], ref["mu"], ref["sigma"]) for f in v["features"]]
                for n in names for seed, v in doc["arms"][n]["per_seed"].items()}
        num = next(iter(fast.values()))[0].n
        curves, speedups = {n: [] for n in names}, {n: [] for n in names if n != scratch}
        for _ in range(e.bootstrap):
            draw = _Resample(fast, rng.integers(0, num, num))
            for n in names:
                seeds = list(rng.choice(list(doc["arms"][n]["per_seed"]), len(doc["arms"][n]["per_seed"])))
                c = draw.curve(n, seeds)
                curves[n].append(c)
                if n != scratch:
                    reach = steps_to_reach(steps, c, draw.curve(scratch, seeds)[-1])
                    speedups[n].append(0.0 if reach is None else steps[-1] / max(reach, 1e-9))
        out[group] = {n: {"fid_std": np.std(curves[n], axis=0).tolist(), "rounds": e.bootstrap} for n in names}
        for n, values in speedups.items():
            out[group][n].update({"speedup_ci90": np.percentile(values, [5, 95]).tolist(),
                                  "speedup_unreached": float(np.mean(np.asarray(values) == 0))})
    return out


class _Resample:
    """One bootstrap round's FIDs: every evaluation's features at the same sample indices `idx`, each computed
    once (a seed drawn twice is reused)."""

    def __init__(self, fast, idx):
        self.fast, self.idx, self.cache = fast, idx, {}

    def curve(self, name, seeds):
        """The mean FID curve over `seeds` (with repeats) of arm `name`."""
        for k in seeds:
            if (name, k) not in self.cache:
                self.cache[name, k] = [f(self.idx) for f in self.fast[name, k]]
        return np.mean([self.cache[name, k] for k in seeds], axis=0)


# ---- summary ----

def _normal_interval(entry):
    """An evaluation with the normal bootstrap interval fid -+ z * std (also for evaluations recorded before the
    interval was defined so: their percentile lo/hi did not bracket the full-sample FID)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + entry.get("level", 0.9)) / 2)
    return {**entry, "lo": entry["fid"] - z * entry["std"], "hi": entry["fid"] + z * entry["std"]}


def steps_to_reach(steps, fids, target):
    """First step at which the FID curve reaches `target`, linearly interpolated between checkpoints (the curve
    starts above it); None if it never does."""
    prev = None
    for s, f in zip(steps, fids):
        if f <= target:
            if prev is None:
                return float(s)
            (s0, f0) = prev
            return float(s0 + (s - s0) * (f0 - target) / max(f0 - f, 1e-12))
        prev = (s, f)
    return None


def speedup(arm, base):
    """How many times fewer steps `arm` takes to reach `base`'s final FID (None: it never does). Capped at the
    number of checkpoints: an arm already below at the first checkpoint counts as reaching it there."""
    reach = steps_to_reach(arm["steps"], arm["fid"], base["fid"][-1])
    return reach, (None if reach is None else base["steps"][-1] / max(reach, 1e-9))


def _per_seed_speedups(arm, base):
    """The speed-up at each seed the two arms share: that seed's curves alone."""
    out = {}
    for seed, v in arm.get("per_seed", {}).items():
        b = base.get("per_seed", {}).get(seed)
        if b is not None:
            out[seed] = speedup({"steps": arm["steps"], "fid": v["fid"]}, {"steps": base["steps"], "fid": b["fid"]})[1]
    return out


def _arm_summary(arm, base, boot):
    """One non-scratch arm against scratch: its speed-up (mean curves, per seed, bootstrap interval) and final
    metrics."""
    return {"speedup": speedup(arm, base)[1], "speedup_ci90": boot.get("speedup_ci90"),
            "speedup_unreached": boot.get("speedup_unreached"), "speedup_per_seed": _per_seed_speedups(arm, base),
            "final_fid": arm["fid"][-1], "final_kid": (arm.get("kid") or [None])[-1],
            "final_fid_inf": (arm.get("fid_inf") or [None])[-1], "seeds": arm.get("seeds")}


def summarize(doc):
    """Per group (dit, sit, clothing_dit): scratch's and usp's final FID (mean curves over seeds), the steps usp
    takes to reach scratch's final FID and the speed-up that is (on the mean curves, per seed, and the paired
    bootstrap's 90% interval), every other arm's speed-up likewise, how each ablation fares against scratch, and
    for DiT the dose-response; the goals, as booleans."""
    arms, summary, goal = doc["arms"], {}, {}
    for group in ("dit", "sit", "clothing_dit"):
        base, usp = arms.get(f"{group}_scratch"), arms.get(f"{group}_usp")
        if not base or not usp:
            continue
        final = base["fid"][-1]
        reach, speed = speedup(usp, base)
        total = base["steps"][-1]
        boot = doc.get("bootstrap", {}).get(group, {})
        others = {name.removeprefix(group + "_"): a for name, a in arms.items() if _in_group(name, group)}
        entry = {"scratch_final_fid": final, "usp_final_fid": usp["fid"][-1], "usp_steps_to_scratch_final": reach,
                 "speedup": speed, "speedup_ci90": boot.get(f"{group}_usp", {}).get("speedup_ci90"),
                 "speedup_per_seed": _per_seed_speedups(usp, base),
                 "usp_wins_at_equal_steps": [u < b for u, b in zip(usp["fid"], base["fid"])],
                 "arms": {arm: _arm_summary(a, base, boot.get(f"{group}_{arm}", {})) for arm, a in others.items()}}
        if group == "dit":
            entry["dose"] = dose_response(doc, entry["arms"])
        for arm in ARMS[1:]:
            other = arms.get(f"{group}_{arm}")
            if other:
                entry[f"{arm}_beats_scratch_at_every_checkpoint"] = all(
                    a < b for a, b in zip(other["fid"], base["fid"]))
                entry[f"{arm}_final_fid"] = other["fid"][-1]
        summary[group] = entry
        if group in ("dit", "sit"):
            goal[f"{group}: usp reaches scratch's final FID within 1/4 of the steps"] = (
                reach is not None and reach <= total / 4)
    # the paper's claims only: usp_random (our control) and the dose arms are reported, not scored
    d = summary.get("dit", {})
    for arm in PAPER_ABLATIONS:
        if f"{arm}_beats_scratch_at_every_checkpoint" in d:
            goal[f"dit: {arm} beats scratch at every checkpoint"] = d[f"{arm}_beats_scratch_at_every_checkpoint"]
    for arm in ("usp_no_ln", "usp_no_normpix"):
        if f"{arm}_final_fid" in d:
            goal[f"dit: usp beats {arm} (final FID)"] = d["usp_final_fid"] < d[f"{arm}_final_fid"]
    return summary, goal


PAPER_ABLATIONS = tuple(a for a in ARMS[1:] if a != "usp_random")


def _in_group(name, group):
    """Whether results key `name` is a non-scratch arm of `group` ('dit_usp' is in 'dit', 'clothing_dit_usp' not)."""
    arm = name.removeprefix(group + "_")
    return name.startswith(group + "_") and arm != "scratch" and (arm in ARMS or arm.startswith(DOSE_PREFIX))


def dose_response(doc, arms):
    """The DiT speed-up against the encoder's pretraining steps: 0 (usp_random), each usp_pt<N>, and the full
    pretraining (usp) -> [{"pretrain_steps", "arm", "speedup", "speedup_ci90", "speedup_per_seed", "seeds"}]."""
    cfg = doc.get("preset_config")
    if not cfg or not cfg["generate"]["dose_steps"]:
        return []
    full = cfg["pretrain"]["steps"]
    points = {0: "usp_random", full: "usp", **{int(a.removeprefix(DOSE_PREFIX)): a for a in arms
                                                if a.startswith(DOSE_PREFIX)}}
    return [{"pretrain_steps": n, "arm": a, **{k: arms[a][k] for k in ("speedup", "speedup_ci90",
                                                                         "speedup_per_seed", "seeds")}}
            for n, a in sorted(points.items()) if a in arms]


# ---- pictures, table ----

def plot_curves(doc, path):
    from usp_fast.pictures import new_figure, save_figure

    groups = [g for g in ("dit", "sit", "clothing_dit") if any(k.startswith(g + "_") and
                                                              k.removeprefix(g + "_") in ARMS for k in doc["arms"])]
    fig, axes = new_figure(3, len(groups), figsize=(6 * len(groups), 11))
    for j, g in enumerate(groups):
        ax_fid, ax_kid, ax_loss = axes[0, j], axes[1, j], axes[2, j]
        dataset = "clothing" if g.startswith("clothing") else "imagenet"
        for name, a in doc["arms"].items():
            if name.removesuffix("_" + a["arm"]) != g:
                continue
            err = [np.subtract(a["fid"], a["fid_lo"]), np.subtract(a["fid_hi"], a["fid"])]
            line = ax_fid.errorbar(a["steps"], a["fid"], yerr=np.clip(err, 0, None), marker="o", capsize=3,
                                   label=f"{a['arm']} ({len(a.get('seeds', [0]))} seeds)")[0]
            for v in a.get("per_seed", {}).values():  # each seed thin, the mean over seeds bold
                ax_fid.plot(a["steps"], v["fid"], color=line.get_color(), lw=0.6, alpha=0.5)
            if a.get("kid") and None not in a["kid"]:
                ax_kid.errorbar(a["steps"], np.multiply(a["kid"], 1e3), yerr=np.multiply(a["kid_std"], 1e3),
                                marker="o", capsize=3, color=line.get_color(), label=a["arm"])
            curve = np.asarray(a["loss_curve"])
            if len(curve):
                ax_loss.plot(curve[:, 0], curve[:, 1], label=a["arm"])
        floors = doc["reference"][dataset]["floors"]
        ax_fid.axhline(floors["recon"]["fid"], color="grey", ls="--", label="VAE recon floor")
        ax_fid.axhline(floors["real_subset"]["fid"], color="grey", ls=":", label="real-subset floor")
        ax_fid.set(title=f"{g}: FID of EMA samples ({doc['preset_config']['eval']['num_samples']})", xlabel="step",
                   ylabel="FID")
        ax_kid.set(title=f"{g}: KID x 1e3 (mean over seeds, std over subsets)", xlabel="step", ylabel="KID x 1e3")
        ax_loss.set(title=f"{g}: training loss (mean over seeds)", xlabel="step", ylabel="loss")
        ax_fid.legend(fontsize=7)
        ax_loss.legend(fontsize=7)
    fig.suptitle(f"USP fidelity, preset {doc['preset']}, {doc['device']}, {doc['date']}")
    save_figure(fig, path, dpi=90)


def plot_dose(doc, path):
    """The DiT speed-up against the encoder's pretraining steps, the mean curves' value with its 90% interval and
    each seed's (nothing is drawn without dose-response arms)."""
    from usp_fast.pictures import new_figure, save_figure

    dose = doc["summary"].get("dit", {}).get("dose")
    if not dose:
        return
    fig, axes = new_figure(1, 1, figsize=(6, 4.5))
    ax = np.ravel(axes)[0]
    for i, d in enumerate(dose):
        x, y = d["pretrain_steps"], d["speedup"] or 0.0
        lo, hi = d["speedup_ci90"] or (y, y)
        ax.errorbar([x], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], marker="o", capsize=4, color="C0",
                    label="mean over seeds, 90% CI" if i == 0 else None)
        seeds = [v or 0.0 for v in d["speedup_per_seed"].values()]
        ax.scatter([x] * len(seeds), seeds, color="C1", s=12, label="per seed" if i == 0 else None)
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set(title=f"DiT speed-up vs encoder pretraining ({doc['preset']})",
           xlabel="encoder pretraining steps", ylabel="speed-up over scratch (0: not reached)")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=90)


def _fmt_ci(ci):
    return "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def table_markdown(doc):
    steps = doc["eval_steps"]
    lines = [f"FID of {doc['preset_config']['eval']['num_samples']} EMA samples ({doc['preset']} preset, "
             f"{doc['device']}, {doc['date'][:10]}; 90% bootstrap interval in brackets)", "",
             "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
    for name, a in doc["arms"].items():
        cells = [f"{f:.1f} [{lo:.0f}, {hi:.0f}]" for f, lo, hi in zip(a["fid"], a["fid_lo"], a["fid_hi"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for dataset, ref in doc["reference"].items():
        fl = ref["floors"]
        lines.append(f"| {dataset} floors: VAE recon {fl['recon']['fid']:.1f}, real subset "
                     f"{fl['real_subset']['fid']:.1f} |" + " |" * (len(steps) - 1) + " |")
    lines += ["", "| group | scratch final FID | usp final FID | steps for usp to reach scratch's final FID | "
                  "speed-up |", "| --- | --- | --- | --- | --- |"]
    for g, s in doc["summary"].items():
        reach = "not reached" if s["usp_steps_to_scratch_final"] is None else f"{s['usp_steps_to_scratch_final']:.0f}"
        speed = "-" if s["speedup"] is None else f"{s['speedup']:.2f}x"
        lines.append(f"| {g} | {s['scratch_final_fid']:.1f} | {s['usp_final_fid']:.1f} | {reach} of {steps[-1]} | "
                     f"{speed} |")
    lines += ["", f"Every arm at the final step, mean over seeds {doc.get('seeds')} (speed-up: steps to scratch's final "
                  "FID; 90% interval from a paired bootstrap over seeds and samples; 0 = not reached)", "",
              "| arm | final FID | final KID x 1e3 (std) | final FID_inf | speed-up | 90% interval | per seed |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for g, s in doc["summary"].items():
        for arm, a in s.get("arms", {}).items():
            kid = "-" if a["final_kid"] is None else f"{a['final_kid'] * 1e3:.1f}"
            kid_std = doc["arms"][f"{g}_{arm}"].get("kid_std", [None])[-1]
            kid += "" if kid_std is None else f" ({kid_std * 1e3:.1f})"
            inf = "-" if a["final_fid_inf"] is None else f"{a['final_fid_inf']:.1f}"
            speed = "-" if a["speedup"] is None else f"{a['speedup']:.2f}x"
            seeds = ", ".join("-" if v is None else f"{v:.2f}" for v in a["speedup_per_seed"].values())
            lines.append(f"| {g}_{arm} | {a['final_fid']:.1f} | {kid} | {inf} | {speed} | "
                         f"{_fmt_ci(a['speedup_ci90'])} | {seeds} |")
    lines += ["", "| encoder | clothing linear probe top-1 (test split) |", "| --- | --- |"]
    for k, v in doc["probe"].items():
        lines.append(f"| {k} | {'-' if v['top1'] is None else format(v['top1'], '.1f')} |")
    lines += ["", "| goal | met |", "| --- | --- |"] + [f"| {k} | {'yes' if v else 'NO'} |"
                                                         for k, v in doc["goal"].items()]
    return "\n".join(lines) + "\n"


def samples_picture(ws, evaluator, doc, path):
    """Rows of 8: each dataset's real images and their VAE reconstructions, then every arm's last-step samples."""
    from usp_fast.pictures import image_grid, save_png

    rows, labels = [], []
    for dataset in ws.p.datasets():
        ref = evaluator.reference(dataset)
        rows += [ref["real"], ref["recon"]]
        labels += [f"{dataset} real", f"{dataset} VAE recon"]
    last = ws.p.eval_steps()[-1]
    for name, a in doc["arms"].items():  # the first seed's samples
        run = a["per_seed"][str(a["seeds"][0])]["run"]
        rows.append(np.load(ws.dir / run / f"samples_step{last}_first8.npy"))
        labels.append(f"{name} @{last}")
    width = min(len(r) for r in rows)
    save_png(image_grid(np.concatenate([r[:width] for r in rows]), cols=width, gap=2, row_labels=labels), path)


def restoration_picture(ws, evaluator, path):
    """The normpix encoder's restorations of masked ImageNet samples (usp_fast.restoration)."""
    from usp_fast.restoration import restore_folder

    made = restore_folder(ws.dir / "pretrain_normpix", ws.shared / ws.p.images, num=ws.p.restore_images,
                          seed=ws.p.seed, out=ws.dir / "restoration.png", device=str(evaluator.device))
    shutil.copyfile(made, path)
