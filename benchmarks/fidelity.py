"""The fidelity experiment: does a USP-initialised DiT/SiT converge faster than one trained from scratch, on real
images with a real VAE? `usp-fast bench --suite fidelity --preset cpu` (or `python benchmarks/run.py --suite
fidelity --preset cpu`), configured by configs/fidelity/<preset>.yaml (schema: fidelity_preset.py).

Phases, each made of ordinary usp-fast runs under the work folder (default runs/fidelity-<preset>), so an
interrupted experiment continues where it stopped (finished caches, pretraining runs, arm chunks, evaluations and
probes are reused, not redone). `run_experiment` below walks them in order:
  1. latent caches (TAEF2): the ImageNet samples at the pretraining resolution (centre crop + `views` extra
     RandomResizedCrops, each with its flip) and at the generation resolution; the clothing set's train subset
     (both resolutions) and test split (pretraining resolution, for the probe)                   fidelity_runs.py
  2. USP pretraining of the encoders: norm-pix target (the paper's), raw target (Table 8c, only for the
     usp_no_normpix arms), the dose-response's shorter norm-pix runs; and the untrained encoder   fidelity_runs.py
  3. every arm's DiT/SiT run, once per training seed (`seeds`), with identical architecture, data order, seed
     and step budget across arms, trained in `eval.checkpoints` chunks; after each chunk the EMA weights are
     evaluated: FID (bootstrap interval), KID and FID_inf of `eval.num_samples` samples (the same noise for
     every arm and seed) against the real images at the generation resolution, their features kept
                                                                          fidelity_runs.py, fidelity_eval.py
  4. floors: FID of the VAE's own reconstructions and of real images, at the same sample count   fidelity_eval.py
     (computed before the arms: every evaluation needs the real images' statistics)
  5. the encoders' linear probe on the clothing test split, beside a random-init encoder's      fidelity_runs.py
  6. results: <out>/fidelity-<device>-<preset>.json (per seed and mean over seeds; speed-ups with a paired
     bootstrap interval), -curves.png, -dose.png, -samples.png, -restoration.png, and the markdown table
     (-table.md)                                                                                fidelity_report.py
Arms: scratch (default init), usp (full transfer), usp_random (the transfer from the untrained encoder: the
copied weights' statistics without pretraining), usp_pt<N> (from an encoder pretrained for N steps), usp_no_ln (no LayerNorm affine, Table 8b), usp_no_normpix
(encoder pretrained on the raw target, Table 8c), usp_reinit_last (last third of the blocks re-initialised,
Table 8g). Every arm uses the LayerNorm affine and the MLP activation of the USP arms, so arms differ only in
their initial weights.
"""
import time
from pathlib import Path

import numpy as np

from usp_fast_benchmarks.env import REPO
from usp_fast_benchmarks.fidelity_eval import Evaluator
from usp_fast_benchmarks.fidelity_preset import load_preset
from usp_fast_benchmarks.fidelity_report import steps_to_reach, summarize, write_report  # noqa: F401 (re-exported)
from usp_fast_benchmarks.fidelity_runs import (Workspace, build_caches, pretrain_encoders, read_json, run_probes,
                                               train_arm, write_json)


def run_fidelity(preset="cpu", work=None, out=None):
    """The whole experiment -> {"results": path, "goal": {...}} or {"skipped": reason} without ../shared."""
    p, path = load_preset(preset)
    ws = Workspace(p, work or p.work or Path("runs") / f"fidelity-{p.name}")
    missing = ws.missing_inputs()
    if missing:
        reason = f"the shared real data is absent ({', '.join(missing)}): skipping the fidelity experiment"
        print(f"fidelity: {reason}")
        return {"skipped": reason}
    print(f"fidelity: preset {p.name} ({path}), work folder {ws.dir}; interrupted runs continue from there")
    print(f"fidelity: {estimate_text(p, ws)}")
    return run_experiment(ws, Path(out or REPO / "benchmarks" / "results"))


def fidelity_suite(ctx):
    """The `fidelity` suite of benchmarks/run.py: writes its own fidelity-<device>-<preset>.* files."""
    return run_fidelity(ctx.preset, ctx.work, ctx.out)


def run_experiment(ws, out):
    """Phases 1 to 6 (see the module docstring), each skipping what the work folder already holds."""
    p = ws.p
    arms = p.arms()
    progress = Progress(p.name, len(arms) * p.generate.steps, len(arms) * p.eval.checkpoints)
    wall0 = time.time()
    progress.line(f"latent caches of {ws.shared / p.images} and {ws.shared / p.clothing}")
    with ws.timed("caches"):
        build_caches(ws)
    with ws.timed("pretrain"):
        pretrain_encoders(ws, progress)
    evaluator = Evaluator(ws)
    for dataset in p.datasets():
        with ws.timed("reference"):
            evaluator.reference(dataset)
    evals = {arm: train_and_evaluate(ws, evaluator, arm, f"arm {i}/{len(arms)} {arm.run_name}", progress)
             for i, arm in enumerate(arms, 1)}
    probes = run_probes(ws, progress)
    progress.line("writing results")
    return write_report(ws, evaluator, arms, evals, probes, time.time() - wall0, out)


def train_and_evaluate(ws, evaluator, arm, label, progress):
    """Phase 3 for one arm: train it up to each evaluation step in turn and evaluate its checkpoint there ->
    {str(step): evaluation}. Evaluations are kept in <arm>/fidelity_evals.json, so a rerun skips them."""
    from usp_fast.artifacts import checkpoint_root, latest_good_checkpoint

    evals_path = ws.dir / arm.run_name / "fidelity_evals.json"
    evals = read_json(evals_path) or {}
    steps = ws.p.eval_steps()
    chunk = steps[0]  # every evaluation step is a chunk boundary
    for target in steps:
        if str(target) in evals:
            continue
        ckpt = latest_good_checkpoint(checkpoint_root(ws.dir / arm.run_name))
        now = _step_of(ckpt) if ckpt is not None else 0
        if now < target:
            progress.line(f"{label}: training steps {now}->{target} of {steps[-1]}")
            t0 = time.time()
            with ws.timed("train_arms"):
                train_arm(ws, arm, chunk, now)
            progress.done(steps=target - now, seconds=time.time() - t0)
            ckpt = latest_good_checkpoint(checkpoint_root(ws.dir / arm.run_name))
        if _step_of(ckpt) != target:
            raise RuntimeError(f"{arm.run_name}: expected a checkpoint at step {target}, the newest is at step "
                               f"{_step_of(ckpt)}")
        progress.line(f"{label}: evaluating step {target} ({ws.p.eval.num_samples} EMA samples)")
        t0 = time.time()
        with ws.timed("evaluate"):
            evals[str(target)] = evaluator.evaluate(ckpt, arm, target)
        progress.done(evals=1, seconds=time.time() - t0)
        write_json(evals_path, evals)
    return evals


def estimate(p, ws=None):
    """The preset's estimated seconds per phase, from its measured per-unit costs `p.cost` (seconds; a missing
    cost counts 0): per pretraining step, per generator training step (DiT and SiT alike) and per training chunk
    (a stage run's start-up), per evaluation (sampling + decoding + Inception of eval.num_samples, the metrics),
    and the fixed phases (caches, references, probes, report). With the Workspace `ws`, what its folder already
    holds (exported encoders, fully evaluated runs: a rerun, or a preset sharing another's `work:`) is left out."""
    from usp_fast_benchmarks.fidelity_runs import encoder_targets, read_json

    c = p.cost
    todo = {t: steps for t, (_, steps) in encoder_targets(p).items()
            if ws is None or not (ws.encoder_dir(t) / "encoder.json").is_file()}
    pretrain = sum(todo.values()) * c.get("pretrain_step", 0)
    arms = [a for a in p.arms()
            if ws is None or len(read_json(ws.dir / a.run_name / "fidelity_evals.json") or {}) < p.eval.checkpoints]
    train = len(arms) * (p.generate.steps * c.get("train_step", 0) + p.eval.checkpoints * c.get("chunk", 0))
    evals = len(arms) * p.eval.checkpoints * c.get("evaluation", 0)
    rest = c.get("caches", 0) + c.get("probes", 0) + c.get("references", 0) + c.get("report", 0)
    return {"pretrain": pretrain, "train_arms": train, "evaluate": evals, "caches_references_probes_report": rest,
            "total": pretrain + train + evals + rest, "runs": len(arms)}


def estimate_text(p, ws=None):
    e = estimate(p, ws)
    if not p.cost:
        return "no measured costs in the preset (cost:), no time estimate"
    parts = ", ".join(f"{k} {v / 60:.0f}" for k, v in e.items() if k not in ("total", "runs"))
    return (f"estimated {e['total'] / 60:.0f} min from the preset's measured costs ({e['runs']} generator runs to do "
            f"of {p.generate.steps} steps, {p.eval.checkpoints} evaluations each; minutes: {parts})")


def _step_of(ckpt):
    return int(ckpt.name.split("_")[1])  # checkpoints/step_00000120 -> 120


class Progress:
    """One line per unit of work: which phase, arm and step, time so far and the estimated time left (from the
    measured seconds per training step and per evaluation of this experiment)."""

    def __init__(self, name, total_steps, total_evals):
        self.name, self.start = name, time.time()
        self.steps_left, self.evals_left = total_steps, total_evals
        self.step_s, self.eval_s = [], []

    def done(self, steps=0, evals=0, seconds=None):
        self.steps_left -= steps
        self.evals_left -= evals
        if seconds is not None and steps:
            self.step_s.append(seconds / steps)
        if seconds is not None and evals:
            self.eval_s.append(seconds / evals)

    def eta(self):
        if not self.step_s or not self.eval_s:
            return "ETA after the first chunk"
        s = self.steps_left * float(np.median(self.step_s)) + self.evals_left * float(np.median(self.eval_s))
        return f"ETA {s / 60:.0f} min"

    def line(self, what):
        msg = f"[fidelity {self.name}] {what} | {(time.time() - self.start) / 60:.1f} min elapsed | {self.eta()}"
        print(msg, flush=True)
