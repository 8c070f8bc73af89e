"""The fidelity experiment's work folder and its usp-fast runs: the latent caches (phase 1), the two encoders'
pretraining (2), the arms' generator training (3, a chunk at a time) and the linear probes (5). Each run is an
ordinary stage run (`usp_fast.stages.run_stage`, resumed from its newest checkpoint) under the work folder, and
each phase skips what a previous invocation finished there."""
import collections
import contextlib
import json
import time
from pathlib import Path

from usp_fast.io import atomic_write_text
from usp_fast.stages import run_stage
from usp_fast_benchmarks.env import REPO
from usp_fast_benchmarks.fidelity_preset import DOSE_PREFIX


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def write_json(path, doc):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1))


class Workspace:
    """The work folder (default runs/fidelity-<preset>): a run folder per stage run, the image lists, the latent
    caches, the references and timings.json; and where the shared inputs (images, VAE) are."""

    def __init__(self, preset, folder):
        self.p, self.dir = preset, Path(folder)
        shared = Path(preset.shared)
        self.shared = shared if shared.is_absolute() else (REPO / shared).resolve()
        self.vae_dir = self.shared / preset.vae
        self.timings = read_json(self.dir / "timings.json") or {}

    def missing_inputs(self):
        need = [self.shared / self.p.images, self.shared / self.p.clothing / "train",
                self.shared / self.p.clothing / "test", self.vae_dir]
        return [str(p) for p in need if not p.exists()]

    @contextlib.contextmanager
    def timed(self, phase):
        """Add the seconds spent inside to `phase` in timings.json: summed over every invocation that worked on
        this experiment (a resumed run adds its share)."""
        t0 = time.time()
        yield
        self.timings[phase] = round(self.timings.get(phase, 0) + time.time() - t0, 1)
        write_json(self.dir / "timings.json", self.timings)

    def run(self, stage, cfg):
        """Run `stage` on the dict of groups `cfg` as `usp-fast train --resume auto` does: resumed from its run
        folder's newest checkpoint if it has one, logging to stdout and the run folder's train.log."""
        return run_stage(stage, cfg, resume="auto", log_to_run=True)

    def encoder_dir(self, target):
        """The exported encoder of pretraining with the 'normpix' or the 'raw' target."""
        return self.dir / f"pretrain_{target}" / "export"

    def image_list(self, key):
        """The file list of 'imagenet', 'clothing_train' or 'clothing_test' (written on first use)."""
        path = self.dir / "lists" / f"{key}.txt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(f"{p} {label}\n" for p, label in self._images(key)))
        return path

    def _images(self, key):
        from usp_fast.data.images import list_images

        p = self.p
        if key == "imagenet":
            items, _ = list_images(self.shared / p.images)
            items = items[: p.num_images] if p.num_images else items
            return [(path, 0) for path, _ in items]  # one image per class: unconditional
        split = key.removeprefix("clothing_")
        items, _ = list_images(self.shared / p.clothing / split)
        if split == "train":  # a balanced subset: the first `clothing_per_class` images of each class
            kept, seen = [], collections.Counter()
            for path, label in items:
                seen[label] += 1
                if seen[label] <= p.clothing_per_class:
                    kept.append((path, label))
            return kept
        if p.clothing_test:  # evenly spread over the split
            return items[:: max(len(items) // p.clothing_test, 1)][: p.clothing_test]
        return items

    def cache_dir(self, key, resolution, views=0):
        return self.dir / "cache" / f"{key}_{resolution}_v{views}"


def data_groups(ws, name, key, resolution, views=0, seed=None):
    """The groups every run of the experiment has: run `name` in the work folder (seeded by `seed`, default the
    preset's), the images of list `key` at `resolution` through their latent cache (`views` extra crops), and the
    VAE."""
    return {"run": {"out_dir": str(ws.dir), "seed": ws.p.seed if seed is None else seed, "name": name},
            "data": {"file_list": str(ws.image_list(key)), "resolution": resolution, "num_workers": 1,
                     "auto_cache": False, "cache_dir": str(ws.cache_dir(key, resolution, views))},
            "vae": {"name": str(ws.vae_dir), "scale": 1.0, "encode_batch": 32, "normalize": ws.p.normalize},
            "cache": {"views": views, "shard_size": 512}}


# ---- phase 1: latent caches ----

def cache_specs(p):
    """name -> (image list, resolution, extra views) of every latent cache the experiment reads."""
    specs = {"pretrain": ("imagenet", p.pretrain_resolution, p.views), "generate": ("imagenet", p.resolution, 0),
             "clothing_generate": ("clothing_train", p.resolution, 0),
             "clothing_probe_train": ("clothing_train", p.pretrain_resolution, 0),
             "clothing_probe_test": ("clothing_test", p.pretrain_resolution, 0)}
    if not p.generate.clothing_arms:  # the probes still need the clothing set at the pretraining resolution
        del specs["clothing_generate"]
    return specs


def build_caches(ws):
    """Every latent cache (the cache stage reuses a finished one)."""
    for name, (key, resolution, views) in cache_specs(ws.p).items():
        ws.run("cache", data_groups(ws, f"cache_{name}", key, resolution, views))


# ---- phase 2: the encoders ----

def encoder_targets(p):
    """target -> (norm_pix, pretraining steps) of every encoder pretrained: the norm-pix target (the paper's), the
    raw target (Table 8c) and the dose-response encoders (norm-pix, shorter)."""
    targets = {"normpix": (True, p.pretrain.steps)}
    if p.needs_raw_encoder():
        targets["raw"] = (False, p.pretrain.steps)
    for arm in p.dose_arms():
        targets[dose_target(arm)] = (True, int(arm.removeprefix(DOSE_PREFIX)))
    return targets


def dose_target(arm):
    return f"normpix_{arm.removeprefix('usp_')}"  # usp_pt250 -> pretrain_normpix_pt250/


def pretrain_encoders(ws, progress):
    """Every encoder of `encoder_targets`, each its own pretraining run (a dose encoder has the whole schedule,
    warm-up and cosine decay, scaled to its length), then the untrained one."""
    for target, (norm_pix, steps) in encoder_targets(ws.p).items():
        if (ws.encoder_dir(target) / "encoder.json").is_file():
            continue
        progress.line(f"pretraining the {target} encoder ({ws.p.pretrain.model}, {steps} steps)")
        ws.run("pretrain", pretrain_config(ws, target, norm_pix, steps))
    random_init_encoder(ws)


def pretrain_config(ws, target, norm_pix, steps=None):
    s = ws.p.pretrain
    steps = steps or s.steps
    warmup = max(round(s.warmup_steps * steps / s.steps), 1) if steps != s.steps else s.warmup_steps
    return {**data_groups(ws, f"pretrain_{target}", "imagenet", ws.p.pretrain_resolution, ws.p.views),
            "model": {"name": s.model, "norm_pix": norm_pix, "mlp_act": "gelu_tanh"},  # DiT's activation
            "optim": {"lr": s.lr, "warmup_steps": warmup, "weight_decay": s.weight_decay,
                      "betas": [0.9, 0.95], "schedule": "cosine"},
            "train": {"epochs": 1e6, "max_steps": steps, "global_batch": s.global_batch,
                      "micro_batch": s.micro_batch, "log_every": max(steps // 50, 1),
                      "ckpt_every": max(steps // 2, 1), "keep_last": 1, "zero_stage": 1}}


# ---- phase 3: the arms' training ----

def train_arm(ws, arm, chunk, steps_now):
    """Train `arm` from `steps_now` to the next multiple of `chunk` (a checkpoint there)."""
    ws.run("generate", arm_config(ws, arm, chunk, steps_now))


def arm_config(ws, arm, chunk, steps_now):
    """One arm's generate run: the same architecture, data order, seeds and step budget for every arm (LayerNorm
    affine and MLP activation of the USP arms included), so that arms differ only in their initial weights."""
    g = ws.p.generate
    model = g.dit if arm.family == "DiT" else g.sit
    key = "imagenet" if arm.dataset == "imagenet" else "clothing_train"
    gen = {"init": "random", "norm_affine": True, "mlp_act": "gelu_tanh", "objective": "auto",
           "unconditional": arm.dataset == "imagenet", "class_dropout_prob": 0.1}
    if arm.arm != "scratch":
        gen["init"] = f"usp:{arm_encoder(ws, arm)}"
    if arm.arm == "usp_no_ln":
        gen["transfer_norms"] = False
    if arm.arm == "usp_reinit_last":  # the last third of the blocks re-initialised (Table 8g)
        from usp_fast.models.dit import MODELS

        depth = MODELS[model]["depth"]
        gen["keep_blocks"] = depth - depth // 3
    return {**data_groups(ws, arm.run_name, key, ws.p.resolution, seed=arm.seed), "model": {"name": model},
            "generate": gen,
            "ema": {"decay": g.ema_decay, "warmup": g.ema_warmup},
            "optim": {"lr": g.lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 0,
                      "schedule": "constant"},
            "train": {"epochs": 1e6, "max_steps": g.steps, "run_steps": chunk - steps_now % chunk,
                      "global_batch": g.global_batch, "micro_batch": g.micro_batch,
                      "log_every": max(min(chunk // 4, 25), 1), "ckpt_every": chunk, "keep_last": 1,
                      "zero_stage": 1}}


def arm_encoder(ws, arm):
    """The encoder export a USP arm transfers from."""
    if arm.arm == "usp_random":
        return random_init_encoder(ws)
    if arm.dose is not None:
        return ws.encoder_dir(dose_target(arm.arm))
    return ws.encoder_dir("raw" if arm.arm == "usp_no_normpix" else "normpix")


# ---- phase 5: the linear probes ----

def run_probes(ws, progress):
    """The linear probe of each encoder (the raw-target one where it was pretrained) on the clothing test split
    -> {label: its probe.json}."""
    encoders = {"usp": ws.encoder_dir("normpix"), "usp_no_normpix": ws.encoder_dir("raw"),
                "random_init": random_init_encoder(ws)}
    if not ws.p.needs_raw_encoder():
        del encoders["usp_no_normpix"]
    results = {}
    for label, encoder in encoders.items():
        out = ws.dir / f"probe_{label}" / "probe.json"
        if not out.is_file():
            progress.line(f"linear probe of the {label} encoder on the clothing set")
            with ws.timed("probe"):
                ws.run("probe", probe_config(ws, label, encoder))
        results[label] = read_json(out)
    return results


def random_init_encoder(ws):
    """The normpix encoder's architecture and latent norm, untrained (seeded): the probe's baseline and the
    usp_random arm's encoder."""
    out = ws.dir / "encoder_random_init" / "export"
    if not (out / "encoder.json").is_file():
        import torch

        from usp_fast.models.usp_vit import USPViT

        model, meta = USPViT.from_pretrained(ws.encoder_dir("normpix"))
        torch.manual_seed(ws.p.seed)
        fresh = type(model)(model.cfg)
        fresh.save_pretrained(out, meta["model"], vae_identity=meta["vae"], resolution=meta["resolution"],
                              step=0, extra_meta={"latent_norm": meta["latent_norm"]})
    return out


def probe_config(ws, label, encoder):
    train_key, train_res, _ = cache_specs(ws.p)["clothing_probe_train"]
    test_key, test_res, _ = cache_specs(ws.p)["clothing_probe_test"]
    pr = ws.p.probe
    return {**data_groups(ws, f"probe_{label}", train_key, train_res),
            "probe": {"encoder": str(encoder), "pool": "cls", "feature_batch": 128,
                      "val_cache_dir": str(ws.cache_dir(test_key, test_res))},
            "optim": {"lr": pr.lr, "weight_decay": 0.0, "warmup_epochs": pr.warmup_epochs},
            "train": {"epochs": pr.epochs, "global_batch": pr.global_batch, "micro_batch": pr.global_batch,
                      "log_every": 10}}
