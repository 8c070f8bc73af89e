"""The fidelity experiment: does a USP-initialised DiT/SiT converge faster than one trained from scratch, on real
images with a real VAE? `usp-fast bench --suite fidelity --preset cpu` (or `python benchmarks/run.py --suite
fidelity --preset cpu`), configured by configs/fidelity/<preset>.yaml.

Phases, each made of ordinary usp-fast runs under the work folder (default runs/fidelity-<preset>), so an
interrupted experiment continues where it stopped (finished caches, pretraining runs, arm chunks, evaluations and
probes are reused, not redone):
  1. latent caches (TAEF2): the ImageNet samples at the pretraining resolution (centre crop + `views` extra
     RandomResizedCrops, each with its flip) and at the generation resolution; the clothing set's train subset
     (both resolutions) and test split (pretraining resolution, for the probe)
  2. USP pretraining of two encoders: norm-pix target (the paper's) and raw target (Table 8c)
  3. every arm's DiT/SiT run with identical architecture, data order, seeds and step budget, trained in
     `eval.checkpoints` chunks; after each chunk the EMA weights are evaluated: FID of `eval.num_samples`
     samples (fixed seeds) against the real images at the generation resolution, with a bootstrap interval
  4. floors: FID of the VAE's own reconstructions and of real images, at the same sample count
  5. the encoders' linear probe on the clothing test split, beside a random-init encoder's
  6. results: <out>/fidelity-<device>-<preset>.json, -curves.png, -samples.png, -restoration.png, and the
     markdown table (-table.md)
Arms: scratch (default init), usp (full transfer), usp_no_ln (no LayerNorm affine, Table 8b), usp_no_normpix
(encoder pretrained on the raw target, Table 8c), usp_reinit_last (last third of the blocks re-initialised,
Table 8g). Every arm uses the LayerNorm affine and the MLP activation of the USP arms, so arms differ only in
their initial weights.
"""
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "fidelity"
ARMS = ("scratch", "usp", "usp_no_ln", "usp_no_normpix", "usp_reinit_last")

log = logging.getLogger("usp_fast.fidelity")


# ---- the preset ----
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


class EvalSpec(_Section):
    checkpoints: int = 5
    num_samples: int = 200
    batch: int = 100
    dit_method: str = "ddim"
    sit_method: str = "ode-euler"
    sampling_steps: int = 25
    seed: int = 0
    bootstrap: int = 100


class ProbeSpec(_Section):
    epochs: int = 100
    global_batch: int = 256
    lr: float = 6.4
    warmup_epochs: int = 10


class Preset(_Section):
    name: str
    shared: str = "../shared"
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
    seed: int = 0
    restore_images: int = 6
    pretrain: PretrainSpec = PretrainSpec()
    generate: GenerateSpec = GenerateSpec()
    eval: EvalSpec = EvalSpec()
    probe: ProbeSpec = ProbeSpec()


def load_preset(name_or_path):
    from usp_fast.errors import ConfigError

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
    if preset.pretrain_resolution % 16 or preset.resolution % 16:
        raise ConfigError(f"{path}: resolutions must be multiples of 16 (VAE /8, patch 2)")
    return preset, path


# ---- progress ----
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


# ---- the experiment ----
class Fidelity:
    def __init__(self, preset, work, out):
        self.p, self.work, self.out = preset, Path(work), Path(out)
        self.shared = (REPO / preset.shared).resolve() if not Path(preset.shared).is_absolute() else Path(preset.shared)
        self.vae_dir = self.shared / preset.vae
        self.timings = self._read_json(self.work / "timings.json") or {}
        self._vae = self._extractor = None
        self.refs = {}
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- helpers --
    @staticmethod
    def _read_json(path):
        return json.loads(Path(path).read_text()) if Path(path).is_file() else None

    def _write_json(self, path, doc):
        from usp_fast.io import atomic_write_text

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=1))

    def _timed(self, phase, fn, *args):
        t0 = time.time()
        out = fn(*args)
        self.timings[phase] = round(self.timings.get(phase, 0) + time.time() - t0, 1)
        self._write_json(self.work / "timings.json", self.timings)
        return out

    def missing_inputs(self):
        need = [self.shared / self.p.images, self.shared / self.p.clothing / "train",
                self.shared / self.p.clothing / "test", self.vae_dir]
        return [str(p) for p in need if not p.exists()]

    def _usp(self, stage, name, cfg):
        """Write `cfg` as runs' configs/<name>.yaml and run it as `usp-fast train --stage STAGE ... --resume auto`."""
        from usp_fast.cli import main

        path = self.work / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return main(["train", "--stage", stage, "--config", str(path), "--resume", "auto"]) or {}

    def _data(self, key, resolution, views=0):
        lists = {"imagenet": self._imagenet_list, "clothing_train": self._clothing_list("train"),
                 "clothing_test": self._clothing_list("test")}
        return {"run": {"out_dir": str(self.work), "seed": self.p.seed},
                "data": {"file_list": str(lists[key]()),
                         "resolution": resolution, "num_workers": 1, "auto_cache": False,
                         "cache_dir": str(self.work / "cache" / f"{key}_{resolution}_v{views}")},
                "vae": {"name": str(self.vae_dir), "scale": 1.0, "encode_batch": 32, "normalize": self.p.normalize},
                "cache": {"views": views, "shard_size": 512}}

    def _imagenet_list(self):
        from usp_fast.data.images import list_images

        path = self.work / "lists" / "imagenet.txt"
        if not path.is_file():
            items, _ = list_images(self.shared / self.p.images)
            items = items[: self.p.num_images] if self.p.num_images else items
            self._write_list(path, [(p, 0) for p, _ in items])  # one image per class: unconditional
        return path

    def _clothing_list(self, split):
        def make():
            from usp_fast.data.images import list_images

            path = self.work / "lists" / f"clothing_{split}.txt"
            if not path.is_file():
                items, _ = list_images(self.shared / self.p.clothing / split)
                if split == "train":  # a balanced subset: the first k images of each class
                    per = {}
                    items = [it for it in items if per.setdefault(it[1], []).append(it) or
                             len(per[it[1]]) <= self.p.clothing_per_class]
                elif self.p.clothing_test:
                    items = items[:: max(len(items) // self.p.clothing_test, 1)][: self.p.clothing_test]
                self._write_list(path, items)
            return path
        return make

    def _write_list(self, path, items):
        from usp_fast.io import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(f"{p} {label}\n" for p, label in items))

    # -- phase 1: caches --
    def caches(self):
        for name, (key, res, views) in self.cache_specs().items():
            cfg = self._data(key, res, views)
            cfg["run"]["name"] = f"cache_{name}"
            self._usp("cache", f"cache_{name}", cfg)

    def cache_specs(self):
        p = self.p
        return {"pretrain": ("imagenet", p.pretrain_resolution, p.views), "generate": ("imagenet", p.resolution, 0),
                "clothing_generate": ("clothing_train", p.resolution, 0),
                "clothing_probe_train": ("clothing_train", p.pretrain_resolution, 0),
                "clothing_probe_test": ("clothing_test", p.pretrain_resolution, 0)}

    # -- phase 2: encoders --
    def encoder_dir(self, target):
        return self.work / f"pretrain_{target}" / "export"

    def pretrain(self):
        s = self.p.pretrain
        for target, norm_pix in (("normpix", True), ("raw", False)):
            if (self.encoder_dir(target) / "encoder.json").is_file():
                continue
            cfg = self._data("imagenet", self.p.pretrain_resolution, self.p.views)
            cfg["run"]["name"] = f"pretrain_{target}"
            cfg |= {"model": {"name": s.model, "norm_pix": norm_pix, "mlp_act": "gelu_tanh"},  # DiT's activation
                    "optim": {"lr": s.lr, "warmup_steps": s.warmup_steps, "weight_decay": s.weight_decay,
                              "betas": [0.9, 0.95], "schedule": "cosine"},
                    "train": {"epochs": 1e6, "max_steps": s.steps, "global_batch": s.global_batch,
                              "micro_batch": s.micro_batch, "log_every": max(s.steps // 50, 1),
                              "ckpt_every": max(s.steps // 2, 1), "keep_last": 1, "zero_stage": 1}}
            self.progress.line(f"pretraining the {target} encoder ({s.model}, {s.steps} steps)")
            self._usp("pretrain", f"pretrain_{target}", cfg)

    # -- phase 3: arms --
    def arm_list(self):
        g = self.p.generate
        return ([("imagenet", "DiT", a) for a in g.dit_arms] + [("imagenet", "SiT", a) for a in g.sit_arms]
                + [("clothing", "DiT", a) for a in g.clothing_arms])

    @staticmethod
    def arm_id(dataset, family, arm):
        return f"{'' if dataset == 'imagenet' else 'clothing_'}{family.lower()}_{arm}"

    def arm_config(self, dataset, family, arm, chunk, steps_now):
        g, depth = self.p.generate, None
        model = g.dit if family == "DiT" else g.sit
        key = "imagenet" if dataset == "imagenet" else "clothing_train"
        cfg = self._data(key, self.p.resolution)
        cfg["run"]["name"] = self.arm_id(dataset, family, arm)
        gen = {"init": "random", "norm_affine": True, "mlp_act": "gelu_tanh", "objective": "auto",
               "unconditional": dataset == "imagenet", "class_dropout_prob": 0.1}
        if arm != "scratch":
            gen["init"] = f"usp:{self.encoder_dir('raw' if arm == 'usp_no_normpix' else 'normpix')}"
        if arm == "usp_no_ln":
            gen["transfer_norms"] = False
        if arm == "usp_reinit_last":
            from usp_fast.models.dit import MODELS

            depth = MODELS[model]["depth"]
            gen["keep_blocks"] = depth - depth // 3
        cfg |= {"model": {"name": model}, "generate": gen,
                "ema": {"decay": g.ema_decay, "warmup": g.ema_warmup},
                "optim": {"lr": g.lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 0,
                          "schedule": "constant"},
                "train": {"epochs": 1e6, "max_steps": g.steps, "run_steps": chunk - steps_now % chunk,
                          "global_batch": g.global_batch, "micro_batch": g.micro_batch,
                          "log_every": max(min(chunk // 4, 25), 1), "ckpt_every": chunk, "keep_last": 1,
                          "zero_stage": 1}}
        return cfg

    def eval_steps(self):
        n, k = self.p.generate.steps, self.p.eval.checkpoints
        return [round(n * (i + 1) / k) for i in range(k)]

    def run_arm(self, index, total, dataset, family, arm):
        from usp_fast.artifacts import checkpoint_root, latest_good_checkpoint

        name = self.arm_id(dataset, family, arm)
        rdir = self.work / name
        evals_path = rdir / "fidelity_evals.json"
        evals = self._read_json(evals_path) or {}
        steps = self.eval_steps()
        for target in steps:
            if str(target) in evals:
                continue
            ckpt = latest_good_checkpoint(checkpoint_root(rdir))
            now = int(ckpt.name.split("_")[1]) if ckpt is not None else 0
            if now < target:
                self.progress.line(f"arm {index}/{total} {name}: training steps {now}->{target} of {steps[-1]}")
                t0 = time.time()
                chunk = steps[0]
                self._timed("train_arms", self._usp, "generate", name, self.arm_config(dataset, family, arm, chunk, now))
                self.progress.done(steps=target - now, seconds=time.time() - t0)
                ckpt = latest_good_checkpoint(checkpoint_root(rdir))
            got = int(ckpt.name.split("_")[1])
            if got != target:
                raise RuntimeError(f"{name}: expected a checkpoint at step {target}, the newest is at step {got}")
            self.progress.line(f"arm {index}/{total} {name}: evaluating step {target} "
                               f"({self.p.eval.num_samples} EMA samples)")
            t0 = time.time()
            evals[str(target)] = self._timed("evaluate", self.evaluate_checkpoint, ckpt, dataset, name, target)
            self.progress.done(evals=1, seconds=time.time() - t0)
            self._write_json(evals_path, evals)
        return evals

    # -- evaluation --
    @property
    def vae(self):
        if self._vae is None:
            from usp_fast.vae import load_vae

            self._vae = load_vae(str(self.vae_dir), 1.0, device=self.device)
        return self._vae

    @property
    def extractor(self):
        if self._extractor is None:
            from usp_fast.metrics.generation import make_extractor

            self._extractor = make_extractor(device=self.device, cache_dir=self.work / "inception")
        return self._extractor

    def pool_features(self, images):
        """uint8 [N, H, W, 3] -> float64 [N, 2048] TF-Inception pool features."""
        import torch

        out = []
        with torch.inference_mode():
            for lo in range(0, len(images), self.p.eval.batch):
                batch = torch.from_numpy(np.ascontiguousarray(images[lo:lo + self.p.eval.batch])).permute(0, 3, 1, 2)
                out.append(self.extractor(batch.to(self.device))[0].double().cpu().numpy())
        return np.concatenate(out)

    def reference(self, dataset):
        """Real images of `dataset` at the generation resolution (ADM centre crop): their features, statistics,
        and the floors at the experiment's sample count: the VAE's reconstructions and a real subset."""
        if dataset in self.refs:
            return self.refs[dataset]
        from usp_fast.data.images import list_images
        from usp_fast.metrics.generation import bootstrap_fid
        from usp_fast.pictures import to_uint8
        from usp_fast.restoration import load_images

        path = self.work / "reference" / f"{dataset}_{self.p.resolution}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            lst = self._imagenet_list() if dataset == "imagenet" else self._clothing_list("train")()
            items, _ = list_images(file_list=lst)
            real, recon = [], []
            for lo in range(0, len(items), 32):
                x = load_images([p for p, _ in items[lo:lo + 32]], self.p.resolution).to(self.device)
                real.append(to_uint8(x))
                if lo < self.p.eval.num_samples:
                    recon.append(to_uint8(self.vae.decode(self.vae.encode(x)[0])))
            real = np.concatenate(real)
            recon = np.concatenate(recon)[: self.p.eval.num_samples]
            feats, recon_feats = self.pool_features(real), self.pool_features(recon)
            from usp_fast.io import atomic_path

            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, real=real, recon=recon, features=feats, recon_features=recon_feats)
        z = np.load(path)
        feats, n = z["features"], self.p.eval.num_samples
        mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
        floors = {}
        for kind, f in (("recon", z["recon_features"]), ("real_subset", feats[: n])):
            floors[kind] = bootstrap_fid(f, mu, sigma, self.p.eval.bootstrap, self.p.eval.seed)
        self.refs[dataset] = {"mu": mu, "sigma": sigma, "count": len(feats), "floors": floors,
                              "real": z["real"][:8], "recon": z["recon"][:8]}
        return self.refs[dataset]

    def evaluate_checkpoint(self, ckpt, dataset, name, step):
        from usp_fast.config import SampleSection
        from usp_fast.diffusion import create_objective
        from usp_fast.metrics.generation import bootstrap_fid
        from usp_fast.models.dit import DiT
        from usp_fast.pictures import to_uint8
        from usp_fast.sampling import sample_latents
        from usp_fast.vae import LatentNorm

        e = self.p.eval
        ref = self.reference(dataset)
        model, meta = DiT.from_pretrained(ckpt, ema=True)
        model.to(self.device)
        method = e.dit_method if meta["objective"] == "ddpm" else e.sit_method
        objective = create_objective(meta["objective"], model.cfg.learn_sigma)
        scfg = SampleSection(method=method, steps=e.sampling_steps, seed=e.seed, cfg_scale=1.0)
        norm = LatentNorm.from_dict(meta.get("latent_norm"))
        images = []
        for k in range(math.ceil(e.num_samples / e.batch)):
            size = min(e.batch, e.num_samples - k * e.batch)
            latents, _ = sample_latents(model, objective, scfg, method, k, size, self.device)
            images.append(to_uint8(self.vae.decode(norm.denormalize(latents))))
        images = np.concatenate(images)
        np.save(self.work / name / f"samples_step{step}_first8.npy", images[:8])
        feats = self.pool_features(images)
        return {"step": step, **bootstrap_fid(feats, ref["mu"], ref["sigma"], e.bootstrap, e.seed),
                "num_samples": e.num_samples, "sampler": f"{method}-{e.sampling_steps}", "ema": True}

    # -- phase 5: probes --
    def probes(self):
        from usp_fast.models.usp_vit import USPViT

        rand_dir = self.work / "encoder_random_init" / "export"
        if not (rand_dir / "encoder.json").is_file():  # the same architecture and latent norm, untrained
            import torch

            model, meta = USPViT.from_pretrained(self.encoder_dir("normpix"))
            torch.manual_seed(self.p.seed)
            fresh = type(model)(model.cfg)
            fresh.save_pretrained(rand_dir, meta["model"], vae_identity=meta["vae"], resolution=meta["resolution"],
                                  step=0, extra_meta={"latent_norm": meta["latent_norm"]})
        results = {}
        specs = self.cache_specs()
        for label, enc in (("usp", self.encoder_dir("normpix")), ("usp_no_normpix", self.encoder_dir("raw")),
                           ("random_init", rand_dir)):
            name = f"probe_{label}"
            out = self.work / name / "probe.json"
            if not out.is_file():
                self.progress.line(f"linear probe of the {label} encoder on the clothing set")
                key, res, _ = specs["clothing_probe_train"]
                cfg = self._data(key, res)
                cfg["run"]["name"] = name
                test_key, test_res, _ = specs["clothing_probe_test"]
                pr = self.p.probe
                cfg |= {"probe": {"encoder": str(enc), "pool": "cls", "feature_batch": 128,
                                  "val_cache_dir": self._data(test_key, test_res)["data"]["cache_dir"]},
                        "optim": {"lr": pr.lr, "weight_decay": 0.0, "warmup_epochs": pr.warmup_epochs},
                        "train": {"epochs": pr.epochs, "global_batch": pr.global_batch,
                                  "micro_batch": pr.global_batch, "log_every": 10}}
                self._timed("probe", self._usp, "probe", name, cfg)
            results[label] = self._read_json(out)
        return results

    # -- phase 6: results --
    def run(self):
        p = self.p
        arms = self.arm_list()
        self.progress = Progress(p.name, len(arms) * p.generate.steps, len(arms) * p.eval.checkpoints)
        wall0 = time.time()
        self.progress.line(f"latent caches of {self.shared / p.images} and {self.shared / p.clothing}")
        self._timed("caches", self.caches)
        self._timed("pretrain", self.pretrain)
        for dataset in ("imagenet", "clothing"):
            self._timed("reference", self.reference, dataset)
        evals = {}
        for i, (dataset, family, arm) in enumerate(arms, 1):
            evals[(dataset, family, arm)] = self.run_arm(i, len(arms), dataset, family, arm)
        probes = self.probes()
        self.progress.line("writing results")
        return self.results(arms, evals, probes, time.time() - wall0)

    def results(self, arms, evals, probes, wall):
        from usp_fast.artifacts import read_metrics
        from usp_fast_benchmarks.run import device_name, git_commit, slug

        import platform
        import torch

        device = device_name(self.device)
        doc = {"preset": self.p.name, "device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **git_commit(), "versions": {"torch": torch.__version__, "python": platform.python_version()},
               "threads": torch.get_num_threads(), "preset_config": self.p.model_dump(),
               # phases summed over every invocation that worked on this experiment (a resumed run adds its share)
               "wall_s": round(sum(self.timings.values()), 1), "last_invocation_s": round(wall, 1),
               "phase_s": self.timings, "eval_steps": self.eval_steps(), "pretrain": {}, "reference": {},
               "arms": {}, "probe": {}}
        for target in ("normpix", "raw"):
            rows = read_metrics(self.work / f"pretrain_{target}")
            doc["pretrain"][target] = {"loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                                       "curve": [[r["step"], r["loss"]] for r in rows]}
        for dataset in ("imagenet", "clothing"):
            ref = self.reference(dataset)
            doc["reference"][dataset] = {"real_images": ref["count"], "resolution": self.p.resolution,
                                         "floors": ref["floors"]}
        for (dataset, family, arm) in arms:
            name = self.arm_id(dataset, family, arm)
            ev = [_normal_interval(evals[(dataset, family, arm)][str(s)]) for s in self.eval_steps()]
            rows = read_metrics(self.work / name)
            transfer = self._read_json(self.work / name / "transfer.json")
            doc["arms"][name] = {"dataset": dataset, "family": family, "arm": arm,
                                 "conditional": dataset == "clothing",
                                 "steps": [e["step"] for e in ev], "fid": [e["fid"] for e in ev],
                                 "fid_lo": [e["lo"] for e in ev], "fid_hi": [e["hi"] for e in ev],
                                 "loss_curve": [[r["step"], r["loss"]] for r in rows],
                                 "transfer_notes": (transfer or {}).get("notes")}
        doc["probe"] = {k: {"top1": v["accuracy"]["final"]["top1"], "top5": v["accuracy"]["final"]["top5"],
                            "num_train": v["num_train"], "num_eval": v["num_eval"], "split": "clothing test"}
                        for k, v in probes.items()}
        doc["summary"], doc["goal"] = summarize(doc)
        stem = f"fidelity-{slug(device)}-{self.p.name}"
        self.out.mkdir(parents=True, exist_ok=True)
        paths = {"json": self.out / f"{stem}.json", "curves": self.out / f"{stem}-curves.png",
                 "samples": self.out / f"{stem}-samples.png", "restoration": self.out / f"{stem}-restoration.png",
                 "table": self.out / f"{stem}-table.md"}
        doc["files"] = {k: str(v.name) for k, v in paths.items()}
        self._write_json(paths["json"], doc)
        plot_curves(doc, paths["curves"])
        self.samples_picture(doc, paths["samples"])
        self.restoration_picture(paths["restoration"])
        from usp_fast.io import atomic_write_text

        atomic_write_text(paths["table"], table_markdown(doc))
        from usp_fast_benchmarks.charts import write_index

        write_index(self.out)
        print(table_markdown(doc))
        return {"results": str(paths["json"]), "goal": doc["goal"], "wall_s": doc["wall_s"]}

    def samples_picture(self, doc, path):
        from usp_fast.pictures import image_grid, save_png

        rows, labels = [], []
        for dataset in ("imagenet", "clothing"):
            ref = self.reference(dataset)
            rows += [ref["real"], ref["recon"]]
            labels += [f"{dataset} real", f"{dataset} VAE recon"]
        last = self.eval_steps()[-1]
        for name in doc["arms"]:
            rows.append(np.load(self.work / name / f"samples_step{last}_first8.npy"))
            labels.append(f"{name} @{last}")
        width = min(len(r) for r in rows)
        save_png(image_grid(np.concatenate([r[:width] for r in rows]), cols=width, gap=2, row_labels=labels), path)

    def restoration_picture(self, path):
        import shutil

        from usp_fast.restoration import restore_folder

        made = restore_folder(self.work / "pretrain_normpix", self.shared / self.p.images, num=self.p.restore_images,
                              seed=self.p.seed, out=self.work / "restoration.png", device=str(self.device))
        shutil.copyfile(made, path)


# ---- summary, pictures, table ----
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


def summarize(doc):
    arms, summary, goal = doc["arms"], {}, {}
    for group in ("dit", "sit", "clothing_dit"):
        base, usp = arms.get(f"{group}_scratch"), arms.get(f"{group}_usp")
        if not base or not usp:
            continue
        final = base["fid"][-1]
        reach = steps_to_reach(usp["steps"], usp["fid"], final)
        total = base["steps"][-1]
        entry = {"scratch_final_fid": final, "usp_final_fid": usp["fid"][-1], "usp_steps_to_scratch_final": reach,
                 "speedup": None if reach is None else total / max(reach, 1e-9),
                 "usp_wins_at_equal_steps": [u < b for u, b in zip(usp["fid"], base["fid"])]}
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
    d = summary.get("dit", {})
    for arm in ARMS[1:]:
        if f"{arm}_beats_scratch_at_every_checkpoint" in d:
            goal[f"dit: {arm} beats scratch at every checkpoint"] = d[f"{arm}_beats_scratch_at_every_checkpoint"]
    for arm in ("usp_no_ln", "usp_no_normpix"):
        if f"{arm}_final_fid" in d:
            goal[f"dit: usp beats {arm} (final FID)"] = d["usp_final_fid"] < d[f"{arm}_final_fid"]
    return summary, goal


def plot_curves(doc, path):
    from usp_fast.pictures import new_figure, save_figure

    groups = [g for g in ("dit", "sit", "clothing_dit") if any(k.startswith(g + "_") and
                                                              k.removeprefix(g + "_") in ARMS for k in doc["arms"])]
    fig, axes = new_figure(2, len(groups), figsize=(5 * len(groups), 8))
    for j, g in enumerate(groups):
        ax_fid, ax_loss = axes[0, j], axes[1, j]
        dataset = "clothing" if g.startswith("clothing") else "imagenet"
        for name, a in doc["arms"].items():
            if name.removesuffix("_" + a["arm"]) != g:
                continue
            err = [np.subtract(a["fid"], a["fid_lo"]), np.subtract(a["fid_hi"], a["fid"])]
            ax_fid.errorbar(a["steps"], a["fid"], yerr=np.clip(err, 0, None), marker="o", capsize=3, label=a["arm"])
            curve = np.asarray(a["loss_curve"])
            if len(curve):
                ax_loss.plot(curve[:, 0], curve[:, 1], label=a["arm"])
        floors = doc["reference"][dataset]["floors"]
        ax_fid.axhline(floors["recon"]["fid"], color="grey", ls="--", label="VAE recon floor")
        ax_fid.axhline(floors["real_subset"]["fid"], color="grey", ls=":", label="real-subset floor")
        ax_fid.set(title=f"{g}: FID of EMA samples ({doc['preset_config']['eval']['num_samples']})", xlabel="step",
                   ylabel="FID")
        ax_loss.set(title=f"{g}: training loss", xlabel="step", ylabel="loss")
        ax_fid.legend(fontsize=7)
        ax_loss.legend(fontsize=7)
    fig.suptitle(f"USP fidelity, preset {doc['preset']}, {doc['device']}, {doc['date']}")
    save_figure(fig, path, dpi=90)


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
    lines += ["", "| encoder | clothing linear probe top-1 (test split) |", "| --- | --- |"]
    for k, v in doc["probe"].items():
        lines.append(f"| {k} | {'-' if v['top1'] is None else format(v['top1'], '.1f')} |")
    lines += ["", "| goal | met |", "| --- | --- |"] + [f"| {k} | {'yes' if v else 'NO'} |"
                                                         for k, v in doc["goal"].items()]
    return "\n".join(lines) + "\n"


# ---- entry point ----
def run_fidelity(preset="cpu", work=None, out=None):
    """The whole experiment -> {"results": path, "goal": {...}} or {"skipped": reason} without ../shared."""
    p, path = load_preset(preset)
    work = Path(work) if work else Path("runs") / f"fidelity-{p.name}"
    exp = Fidelity(p, work, out or REPO / "benchmarks" / "results")
    missing = exp.missing_inputs()
    if missing:
        reason = f"the shared real data is absent ({', '.join(missing)}): skipping the fidelity experiment"
        print(f"fidelity: {reason}")
        return {"skipped": reason}
    print(f"fidelity: preset {p.name} ({path}), work folder {work}; interrupted runs continue from there")
    return exp.run()
