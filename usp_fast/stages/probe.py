"""Linear probing of a frozen USP encoder on cached latents with labels, and a per-block probe (the paper's
Figure 4): `usp-fast train --stage probe --config configs/probe/vit_b.yaml [key=value ...]`.

Recipe (MAE's linear probe): features of the frozen encoder (cls token, or the average of the patch tokens),
BatchNorm without affine, one linear layer (trunc-normal std 0.01), LARS (timm's `Lars`, trust coefficient 1e-3,
no weight decay; biases not adapted), lr = blr x batch / 256 with blr 0.1 and batch 16384 (accumulated from
train.micro_batch), linear warm-up then half-cosine per step (the engine's schedule, usp_fast.optim), 90 epochs for B,
50 for L. Top-1 / top-5 on a validation cache (probe.val_cache_dir), or on the training cache when none is given
(said so in the result).

The encoder is frozen and the cache's only augmentation is the stored horizontal flip, so its features (plain
and flipped) are computed once and every epoch trains the heads on them, drawing a flip per sample: the same
optimisation as running the encoder every step, at a fraction of the cost. A per-block probe trains one
independent head per listed block (features after that block, before the final norm) in the same pass.

The stage runs `run()` on rank 0 only (one process does it all); it
does not use the shared engine, because it trains heads on features extracted once, not on the per-step stream.
"""
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from usp_fast.config import ProbeConfig
from usp_fast.errors import ConfigError
from usp_fast.io import atomic_path, atomic_write_text
from usp_fast.optim import base_lr
from usp_fast.stages.base import Stage

log = logging.getLogger("usp_fast.stages.probe")

class ProbeStage(Stage):
    """Trains heads on features extracted once, not on the per-step stream, so it does not use the shared engine:
    one process (rank 0) does it all while other ranks wait."""
    name = "probe"
    config = ProbeConfig
    needs_labels = True  # the heads train and evaluate on the cache's class labels
    splits_batch = False  # rank 0 trains the heads alone: train.global_batch is not split over ranks

    def check_inputs(self):
        from usp_fast.data.prepare import check_labelled_cache

        super().check_inputs()
        p = self.cfg.probe
        check_labelled_cache(p.val_cache_dir, "probe.val_cache_dir")
        if bool(p.encoder) == bool(p.generator):
            raise ConfigError("probe: set exactly one of probe.encoder (an encoder export) or probe.generator "
                              "(a generate run's generator/ or checkpoint folder)")
        if p.encoder and not Path(p.encoder).is_dir():
            raise ConfigError(f"probe.encoder {p.encoder} is not a folder: expected an encoder export "
                              "(runs/<pretrain>/export)")

    def run(self, resume=None, overwrite=False, allow_config_change=False):
        from usp_fast import dist

        rank, _, device = dist.init()
        result = run(self.cfg, device) if rank == 0 else {}
        dist.barrier()
        return result


# ---- the frozen encoder ----
def load_frozen_encoder(export_dir, device="cpu"):
    """A USPViT holding the exported encoder weights (decoder unused), frozen. -> (model, meta)."""
    from usp_fast.models.usp_vit import USPViT

    model, meta = USPViT.from_pretrained(export_dir)
    return model.to(device).requires_grad_(False), meta


def resolve_blocks(blocks, depth):
    """[] -> [] (final features only); [-1] -> every block; else the listed indices, checked."""
    if list(blocks) == [-1]:
        return list(range(depth))
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"probe.blocks {bad}: the encoder has blocks 0..{depth - 1} (or [-1] for all)")
    return sorted(set(blocks))


@torch.no_grad()
def encoder_features(model, latents, pool, blocks=()):
    """-> {name: [B, D]}: 'final' (after the final norm) and 'block_i' (after block i, no norm) per listed block."""
    def pooled(t):
        return t[:, 0] if pool == "cls" else t[:, 1:].mean(1)

    out = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: out.__setitem__(f"block_{i}", pooled(o)))
             for i in blocks]
    try:
        out["final"] = pooled(model.forward_encoder(latents))
    finally:
        for h in hooks:
            h.remove()
    return out


def generator_features(model, objective, latents, blocks, noise_level, generator):
    """Per-block features of a DiT/SiT (the paper's Figure 4): the residual stream after each listed block, averaged
    over tokens, for latents noised to `noise_level` (DiT: timestep level x (T - 1); SiT: t = 1 - level) with the null
    class (or class 0 without label dropout), so no label information enters."""
    B = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if model.cfg.family == "DiT":
        t = torch.full((B,), round(noise_level * (objective.num_timesteps - 1)), dtype=torch.long, device=latents.device)
        x = objective.q_sample(latents, t, noise)
    else:
        t = torch.full((B,), objective.time_at_noise_level(noise_level), device=latents.device)
        x = objective.interpolate(latents, noise, t)
    y = torch.full((B,), model.cfg.null_class or 0, dtype=torch.long, device=latents.device)
    return {f"block_{i}": v for i, v in model.block_features(x, t, y, blocks).items()}


def extract_cache_features(feature_fn, cache, batch, device, dtype=torch.float16):
    """feature_fn(latents [b, C, H, W], batch_key) -> {name: [b, D]} over every cached latent, plain and flipped
    -> ({name: [N, 2, D]}, labels [N]). batch_key numbers the calls, for deterministic per-batch noise."""
    n = len(cache)
    feats = {}
    for lo in range(0, n, batch):
        idx = np.arange(lo, min(lo + batch, n))
        for flip in (0, 1):
            mean, _, _ = cache.read(idx, np.full(len(idx), flip))
            f = feature_fn(torch.from_numpy(mean).to(device).float(), 2 * lo + flip)
            for k, v in f.items():
                if k not in feats:
                    feats[k] = torch.empty(n, 2, v.shape[1], dtype=dtype)
                feats[k][lo: lo + len(idx), flip] = v.to(dtype).cpu()
    return feats, torch.from_numpy(cache.labels.copy())


def feature_source(p, seed, device):
    """The frozen network named by probe.encoder or probe.generator -> (feature_fn, meta, model). The cached
    latents are normalised as the network was trained (the latent_norm its export records) before its forward."""
    from usp_fast.vae import LatentNorm

    if bool(p.encoder) == bool(p.generator):
        raise ValueError("probe: set exactly one of probe.encoder (an encoder export) or probe.generator (a DiT/SiT "
                         "generator/ folder or checkpoint folder)")
    if p.encoder:
        model, meta = load_frozen_encoder(p.encoder, device)
        blocks = resolve_blocks(p.blocks, len(model.blocks))
        norm = LatentNorm.of(meta)
        return (lambda x, key: encoder_features(model, norm.normalize(x), p.pool, blocks)), meta, model
    from usp_fast.diffusion import create_objective
    from usp_fast.sampling import load_generator
    from usp_fast.seeding import probe_noise_seed

    if not 0.0 <= p.noise_level < 1.0:
        raise ValueError(f"probe.noise_level {p.noise_level}: expected a fraction in [0, 1)")
    model, meta = load_generator(p.generator)
    model = model.to(device)
    objective = create_objective(meta["objective"], model.cfg.learn_sigma)
    blocks = resolve_blocks(p.blocks or [-1], len(model.blocks))
    norm = LatentNorm.of(meta)

    def fn(x, key):
        gen = torch.Generator().manual_seed(probe_noise_seed(seed, key))
        return generator_features(model, objective, norm.normalize(x), blocks, p.noise_level, gen)

    return fn, meta, model


# ---- heads and training ----
class LinearHead(nn.Sequential):
    """MAE's probe head: BatchNorm without affine, then a linear layer (trunc-normal std 0.01, zero bias)."""

    def __init__(self, dim, num_classes):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def lars_groups(heads, weight_decay=0.0):
    """timm Lars groups as MAE's LARS: trust-ratio adaptation (and decay) for matrices, plain SGD for biases."""
    mats = [p for h in heads.values() for p in h.parameters() if p.ndim > 1]
    vecs = [p for h in heads.values() for p in h.parameters() if p.ndim <= 1]
    return [{"params": mats, "weight_decay": weight_decay, "always_adapt": True},
            {"params": vecs, "weight_decay": 0.0, "always_adapt": False}]


def train_heads(feats, labels, num_classes, epochs, global_batch, micro_batch, lr, warmup_epochs, momentum=0.9,
                trust_coeff=1e-3, weight_decay=0.0, min_lr=0.0, seed=0, device="cpu", log_every=50,
                warmup_steps=None, schedule="cosine"):
    """One linear head per feature name, trained jointly (independent parameters, summed losses). `lr` is the
    peak lr of the whole (accumulated) global batch; per step it follows the engine's schedule (usp_fast.optim)."""
    from timm.optim import Lars

    from usp_fast.optim import schedule_lr, warmup_length

    torch.manual_seed(seed)
    n = len(labels)
    global_batch = min(global_batch, n)
    micro_batch = min(micro_batch, global_batch)
    if global_batch % micro_batch:
        raise ValueError(f"train.global_batch {global_batch} must be a multiple of train.micro_batch {micro_batch}")
    heads = nn.ModuleDict({k: LinearHead(v.shape[-1], num_classes) for k, v in feats.items()}).to(device)
    opt = Lars(lars_groups(heads, weight_decay), lr=lr, momentum=momentum, trust_coeff=trust_coeff)
    steps_per_epoch = max(n // global_batch, 1)
    total = math.ceil(epochs * steps_per_epoch)  # train.epochs may be fractional
    warmup = warmup_length(warmup_epochs, warmup_steps, steps_per_epoch)
    rng = np.random.default_rng(seed)
    ce = nn.CrossEntropyLoss()
    heads.train()
    step, history = 0, []
    for epoch in range(math.ceil(epochs)):
        perm, flips = torch.from_numpy(rng.permutation(n)), torch.from_numpy(rng.integers(0, 2, n))
        for s in range(min(steps_per_epoch, total - step)):
            for group in opt.param_groups:
                group["lr"] = schedule_lr(step, lr, warmup, total, min_lr, schedule)
            opt.zero_grad(set_to_none=True)
            total_loss = 0.0
            for m in range(0, global_batch, micro_batch):
                idx = perm[s * global_batch + m: s * global_batch + m + micro_batch]
                y = labels[idx].to(device)
                loss = sum(ce(heads[k](f[idx, flips[idx]].to(device).float()), y) for k, f in feats.items())
                (loss * len(idx) / global_batch).backward()
                total_loss += loss.detach() * len(idx) / global_batch
            opt.step()
            step += 1
            if step % log_every == 0 or step == total:
                history.append({"step": step, "epoch": step / steps_per_epoch,
                                "loss": total_loss.item() / len(feats), "lr": opt.param_groups[0]["lr"]})
                log.info("step %d/%d loss %.4f lr %.3g", step, total, history[-1]["loss"], history[-1]["lr"])
    return heads.eval(), history


@torch.no_grad()
def accuracy(heads, feats, labels, device="cpu", batch=4096):
    """Top-1 / top-5 (%) per head on the plain (un-flipped) features (top-5 is top-C with fewer than 5 classes), and
    `correct`: 1/0 per evaluated image for top-1 (for paired comparisons)."""
    from usp_fast.metrics.classification import top_k_accuracy

    return {k: top_k_accuracy(lambda x, head=heads[k]: head(x[:, 0].to(device).float()), f, labels, (1, 5), batch)
            for k, f in feats.items()}


# ---- the stage ----
def run(cfg, device="cpu"):
    from usp_fast.config import to_dict
    from usp_fast.data.cache import default_cache_dir, open_cache

    p = cfg.probe
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    feature_fn, meta, _ = feature_source(p, cfg.run.seed, device)
    cache, manifest = open_cache(default_cache_dir(cfg), cfg)
    if meta.get("vae") and meta["vae"].get("fingerprint") != manifest["vae"].get("fingerprint"):
        log.warning("the network was trained on latents of another VAE (%s) than this cache's (%s)",
                    meta["vae"].get("name"), manifest["vae"].get("name"))
    fdtype = getattr(torch, p.feature_dtype)
    start = time.time()
    feats, labels = extract_cache_features(feature_fn, cache, p.feature_batch, device, fdtype)
    log.info("features of %d latents (x2 flips) for %s in %.1fs", len(labels), sorted(feats), time.time() - start)
    t, o = cfg.train, cfg.optim
    lr = base_lr(o, min(t.global_batch, len(labels)))  # a batch larger than the data set is the data set
    heads, history = train_heads(feats, labels, manifest["num_classes"], t.epochs, t.global_batch, t.micro_batch,
                                 lr, o.warmup_epochs, p.momentum, p.trust_coeff, o.weight_decay, o.min_lr,
                                 cfg.run.seed, device, t.log_every, o.warmup_steps, o.schedule)
    if p.val_cache_dir:
        val_cache, _ = open_cache(p.val_cache_dir, cfg)
        val_feats, val_labels = extract_cache_features(feature_fn, val_cache, p.feature_batch, device, fdtype)
        split = str(p.val_cache_dir)
    else:
        val_feats, val_labels, split = feats, labels, "train (no probe.val_cache_dir given)"
    acc = accuracy(heads, val_feats, val_labels, device)
    result = {"network": str(p.encoder or p.generator), "step": meta.get("step"), "pool": p.pool,
              "noise_level": p.noise_level if p.generator else None, "evaluated_on": split,
              "num_train": len(labels), "num_eval": len(val_labels), "num_classes": manifest["num_classes"],
              "accuracy": acc, "history": history, "config": to_dict(cfg)}
    blocks = {int(k.split("_")[1]): v["top1"] for k, v in acc.items() if k.startswith("block_")}
    if blocks:  # the paper's Figure 4: accuracy against block index
        from usp_fast.pictures import plot_probe_blocks

        label = f"noise level {p.noise_level:g}" if p.generator else Path(p.encoder).parent.name or "encoder"
        result["blocks_plot"] = str(plot_probe_blocks({label: blocks}, run_dir / "probe_blocks.png",
                                                      f"per-block linear probe: {cfg.run.name}"))
    atomic_write_text(run_dir / "probe.json", json.dumps(result, indent=1))
    with atomic_path(run_dir / "probe_heads.pt") as tmp:
        torch.save({k: h.state_dict() for k, h in heads.items()}, tmp)
    for k in sorted(acc, key=lambda s: (s == "final", int(s.split("_")[1]) if s != "final" else 0)):
        print(f"{k}: top-1 {acc[k]['top1']:.2f}%  top-5 {acc[k]['top5']:.2f}%")
    print(f"written to {run_dir / 'probe.json'} (evaluated on {split})")
    return result
