"""The training loop every stage shares: DeepSpeed engine, deterministic data stream, lr schedule, logging,
checkpoints and exact resume. A stage plugs in through `usp_fast.task.Task`."""
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from . import dist
from .config import to_dict
from .data.cache import LatentCache, check_manifest, default_cache_dir
from .data.stream import CacheStream, StreamPlan
from .io import atomic_write_text

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"  # written last into a checkpoint folder: only complete checkpoints are resumed from


def lr_at(step, cfg, steps_per_epoch, total_steps, base_lr):
    """Linear warm-up over optim.warmup_epochs, then a half-cosine to optim.min_lr (or constant), per step."""
    o = cfg.optim
    warmup = o.warmup_epochs * steps_per_epoch
    if step < warmup:
        return base_lr * step / warmup
    if o.schedule == "constant":
        return base_lr
    if o.schedule != "cosine":
        raise ValueError(f"optim.schedule {o.schedule!r}: expected 'cosine' or 'constant'")
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return o.min_lr + (base_lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def compute_dtype(cfg, device):
    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if p not in ("bf16", "fp32"):
        raise ValueError(f"train.precision {p!r}: expected auto, bf16 or fp32")
    return torch.bfloat16 if p == "bf16" else torch.float32


def deepspeed_config(cfg, world_size, dtype):
    t = cfg.train
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (t.micro_batch * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**12,  # we log ourselves, at log intervals only
        "zero_allow_untested_optimizer": True,
    }


def step_seed(seed, step, micro, rank):
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)[0] >> 1)


def complete_checkpoints(ckpt_root):
    """Finished checkpoints, oldest first, as (step, path)."""
    root = Path(ckpt_root)
    found = [(int(p.name.split("_")[1]), p) for p in root.glob("step_*") if (p / COMPLETE).exists()] if root.is_dir() else []
    return sorted(found)


def resolve_resume(resume, ckpt_root):
    """--resume: None/'' (fresh run), 'auto' (latest complete checkpoint, if any) or a checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return path


class Trainer:
    def __init__(self, cfg, task, resume=None):
        import deepspeed

        self.cfg, self.task = cfg, task
        self.rank, self.world, self.device = dist.init()
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.ckpt_root = self.run_dir / CKPT_DIR
        self.dtype = compute_dtype(cfg, self.device)
        torch.manual_seed(cfg.run.seed)  # model init; all later randomness comes from per-step generators

        self.data = self._data_source(cfg)  # a LatentCache, or an OnlineSource holding the frozen VAE
        t = cfg.train
        self.plan = StreamPlan(len(self.data), cfg.run.seed, t.global_batch, t.micro_batch, self.world, self.rank,
                               flip=cfg.data.flip, views=self.manifest.get("views", 1))
        self.steps_per_epoch = len(self.data) / t.global_batch
        self.total_steps = math.ceil(t.epochs * self.steps_per_epoch)
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        o = cfg.optim
        self.base_lr = o.lr if o.lr is not None else o.blr * t.global_batch / 256

        model = task.build_model(self.manifest).to(self.device)
        optimizer = task.build_optimizer(task.param_groups(model), self.base_lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, self.world, self.dtype))
        self.start_step = 0
        ckpt = resolve_resume(resume, self.ckpt_root)
        if ckpt is not None:
            self._load(ckpt)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            log.info("%s: %d %s, %d ranks, global batch %d (micro %d x accum %d), %.2f steps/epoch, "
                     "%d steps, base lr %.3g, %s on %s, ZeRO %d", task.stage, len(self.data),
                     "latents" if cfg.data.source == "cache" else "images (online encode)", self.world,
                     t.global_batch, t.micro_batch, self.plan.accum, self.steps_per_epoch, self.total_steps,
                     self.base_lr, str(self.dtype).replace("torch.", ""), self.device.type, t.zero_stage)

    def _data_source(self, cfg):
        """Sets self.manifest (what the task builds its model from) and returns the sample source."""
        if cfg.data.source == "online":
            from .data.online import OnlineSource
            from .vae import load_vae

            vae = load_vae(cfg.vae.name, cfg.vae.scale, device=self.device)
            source = OnlineSource(cfg, vae, self.device)
            self.manifest = source.manifest
            return source
        if cfg.data.source != "cache":
            raise ValueError(f"data.source {cfg.data.source!r}: expected cache or online")
        cache_dir = default_cache_dir(cfg)
        self.manifest = check_manifest(cache_dir, cfg)
        return LatentCache(cache_dir, self.manifest)

    # ---- checkpoints ----
    def _save(self, step):
        tag = f"step_{step:08d}"
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag,
                                    client_state={"step": step, "task": self.task.state_dict()})
        dist.barrier()
        if dist.is_main():
            atomic_write_text(self.ckpt_root / tag / COMPLETE, json.dumps({"step": step}))
            for _, old in complete_checkpoints(self.ckpt_root)[: -self.cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s", self.ckpt_root / tag)
        dist.barrier()

    def _load(self, path):
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if client is None:
            raise RuntimeError(f"checkpoint {path} could not be loaded")
        self.start_step = int(client["step"])
        self.task.load_state_dict(client.get("task", {}))
        if dist.is_main():
            self._truncate_metrics(self.start_step)
            log.info("resumed from %s at step %d", path, self.start_step)

    def _truncate_metrics(self, step):
        """Drop metric rows past the resumed step: the resumed run writes them again."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            atomic_write_text(path, "".join(r + "\n" for r in rows))

    # ---- the loop ----
    def _loader(self):
        if self.cfg.data.source == "online":  # decoded and encoded ahead by a background thread
            return self.data.stream(self.plan, self.start_step, self.total_steps)
        stream = CacheStream(self.data, self.plan, self.start_step, self.total_steps)
        nw = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=nw,
                                           pin_memory=self.device.type == "cuda",
                                           prefetch_factor=4 if nw else None, persistent_workers=False)

    def _latents(self, batch, gen):
        if "ready" in batch:  # online encode on the side stream
            torch.cuda.current_stream(self.device).wait_event(batch["ready"])
        mean = batch["mean"].to(self.device, non_blocking=True).float()
        if self.cfg.data.sample_posterior:
            std = batch["std"].to(self.device, non_blocking=True).float()
            mean = mean + std * torch.randn(mean.shape, device=self.device, generator=gen)
        out = {"latents": mean.to(self.dtype)}
        if self.task.needs_labels:
            out["labels"] = batch["labels"].to(self.device, non_blocking=True)
        return out

    def train(self):
        cfg, t = self.cfg, self.cfg.train
        main = dist.is_main()
        writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(self.run_dir / "tb"))
        gen = torch.Generator(device=self.device)
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.task.stage, unit="step",
                   disable=not main, dynamic_ncols=True)
        loss_sum = torch.zeros((), device=self.device)
        metric_sums = {}
        tick, tick_step = time.time(), self.start_step
        batches = iter(self._loader())
        end = self.total_steps if t.run_steps is None else min(self.total_steps, self.start_step + t.run_steps)
        audit = open(self.run_dir / f"samples_r{self.rank}.txt", "a") if t.audit_samples else None
        self.engine.train()
        for step in range(self.start_step, end):
            lr = lr_at(step, cfg, self.steps_per_epoch, self.total_steps, self.base_lr)
            for group in self.optimizer.param_groups:  # lr_scale: e.g. layer-wise lr decay groups
                group["lr"] = lr * group.get("lr_scale", 1.0)
            for micro in range(self.plan.accum):
                gen.manual_seed(step_seed(cfg.run.seed, step, micro, self.rank))
                raw = next(batches)
                if audit is not None:
                    audit.write(f"{step} {' '.join(map(str, raw['indices'].tolist()))}\n")
                batch = self._latents(raw, gen)
                loss, metrics = self.task.loss(self.engine, batch, gen)
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().float()
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
            self.task.after_step(self.engine.module, step)
            done = step + 1
            bar.update(1)
            if done % t.log_every == 0 or done == end:  # the only host syncs
                n = (done - tick_step) * self.plan.accum
                row = {"step": done, "epoch": done / self.steps_per_epoch,
                       "loss": dist.mean_across_ranks(loss_sum / n).item(), "lr": lr}
                for k, v in metric_sums.items():
                    row[k] = dist.mean_across_ranks(v / n).item()
                gn = self.engine.get_global_grad_norm()
                if gn is not None:
                    row["grad_norm"] = float(gn)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.time() - tick
                row["img_per_s"] = (done - tick_step) * t.global_batch / max(elapsed, 1e-9)
                if main:
                    self._log(row, writer, bar)
                loss_sum.zero_()
                metric_sums = {}
                tick, tick_step = time.time(), done
            if done % t.ckpt_every == 0 and done < end:
                self._save(done)
        bar.close()
        if audit is not None:
            audit.close()
        if end > self.start_step or not complete_checkpoints(self.ckpt_root):
            self._save(end)
        if end < self.total_steps:
            log.info("stopped at step %d of %d (train.run_steps); continue with --resume auto", end, self.total_steps)
            if writer is not None:
                writer.close()
            return {"stopped_at": end}
        result = self._finish()
        if writer is not None:
            writer.close()
        return result

    def _log(self, row, writer, bar):
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(f"{self.task.stage}/{k}", v, row["step"])
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", ips=f"{row['img_per_s']:.0f}")
        log.info(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def _finish(self):
        import deepspeed

        module = self.engine.module
        epoch = self.total_steps / self.steps_per_epoch
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.train.zero_stage == 3):
            result = self.task.finish(module, self.run_dir, self.manifest, self.total_steps, epoch) if dist.is_main() else {}
        dist.barrier()
        return result
