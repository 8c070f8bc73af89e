"""The training loop every stage shares: DeepSpeed engine, deterministic data stream, lr schedule, logging,
checkpoints and exact resume. A stage plugs in through `usp_fast.stages.base.Stage`."""
import contextlib
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from . import dist
from .config import to_dict
from .data.cache import default_cache_dir, open_cache
from .data.stream import CacheStream, StreamPlan
from .artifacts import (checkpoint_root, checkpoint_tag, complete_checkpoints, prune_checkpoints, read_metrics, run_dir,
                        truncate_metrics, write_complete_marker)
from .errors import CheckpointError, ConfigError, TrainingDiverged, UserError
from .io import atomic_write_text
from .optim import base_lr, lr_at
from .pictures import plot_training_curves
from .progress import progress_bar
from .run_folder import RunFolderError, RunLock, choose_start, disk_full_is_one_line
from .seeding import step_seed
from .vae import LatentNorm

log = logging.getLogger(__name__)

UNIVERSAL = ".universal"  # under checkpoints/: a checkpoint converted to load on another number of ranks


def compute_dtype(cfg, device):
    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if p not in ("bf16", "fp32"):
        raise ValueError(f"train.precision {p!r}: expected auto, bf16 or fp32")
    return torch.bfloat16 if p == "bf16" else torch.float32


def deepspeed_config(cfg, world_size, dtype):
    t = cfg.train
    accum = t.global_batch // (t.micro_batch * world_size)
    bf16 = dtype == torch.bfloat16
    if bf16 and accum > 1 and t.zero_stage == 0:
        # ZeRO-0 keeps bf16 gradients with no fp32 accumulation buffer: 32 bf16 additions lose ~5 bits
        raise ConfigError(f"train.precision bf16 with {accum} accumulation micro-steps needs train.zero_stage >= 1 "
                          "(fp32 gradient accumulation); with ZeRO-0 use train.precision=fp32 or no accumulation")
    config = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**12,  # we log ourselves, at log intervals only
        "zero_allow_untested_optimizer": True,
    }
    if bf16 and t.zero_stage >= 1:  # accumulate micro-step gradients in fp32, not bf16
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return merge_deepspeed_config(config, t.deepspeed_config) if t.deepspeed_config else config


# what the generated DeepSpeed config's keys follow: a train.deepspeed_config may repeat them, not change them
_SET_BY = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
           "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x ranks)",
           "gradient_clipping": "optim.grad_clip", "zero_optimization.stage": "train.zero_stage",
           "bf16.enabled": "train.precision", "data_types.grad_accum_dtype": "train.precision",
           "steps_per_print": "the trainer's own logging (train.log_every)",
           "zero_allow_untested_optimizer": "the stage's optimizer (optim.*)"}
_NOT_PASSED = {"optimizer": "the stage builds the optimizer (optim.*)",
               "scheduler": "the trainer sets the lr every step (optim.*)",
               "fp16": "fp16 with loss scaling is not supported: use train.precision=bf16"}


def merge_deepspeed_config(generated, extra):
    """train.deepspeed_config merged over the generated config. Raises ConfigError naming the key when it would
    change what the run's own keys set (say which key to set instead), or names optimizer, scheduler or fp16."""
    from .config import _deep_update, flatten

    for top, why in _NOT_PASSED.items():
        if top in extra and not (top == "fp16" and not flatten(extra).get("fp16.enabled", True)):
            raise ConfigError(f"train.deepspeed_config.{top}: not passed to DeepSpeed, {why}")
    ours, theirs = flatten(generated), flatten(extra)
    for k, v in theirs.items():
        if k in ours and ours[k] != v:
            raise ConfigError(f"train.deepspeed_config.{k}={v!r} contradicts the run's {ours[k]!r}: set "
                              f"{_SET_BY.get(k, 'the key of the run that sets it')} instead")
    log.info("DeepSpeed config: merged over the generated one: %s", ", ".join(f"{k}={v!r}" for k, v in theirs.items()))
    return _deep_update(generated, extra)


def master_params(module):
    """The fp32 master copy of each parameter of a DeepSpeed-wrapped module, in named_parameters() order: with
    bf16 training the module holds bf16-rounded weights and the optimizer the fp32 masters (ZeRO 0-2, ZeRO-3),
    read through DeepSpeed's public `safe_get_full_fp32_param`; fp32 training's parameters are their own masters.
    With several ranks this is a collective (each rank holds part of the masters): call it on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in module.parameters():
        master = safe_get_full_fp32_param(p) if p.dtype != torch.float32 else None
        out.append(p.detach() if master is None else master)
    return out


@contextlib.contextmanager
def fp32_master_weights(module):
    """Inside, every parameter of `module` holds its fp32 master value (see master_params), so that exports
    written from module.state_dict() carry the trained fp32 weights, not their bf16 rounding. Collective with
    several ranks: enter it on every rank. The module's own tensors are restored on exit."""
    params = list(module.parameters())
    if all(p.dtype == torch.float32 for p in params):
        yield module
        return
    masters = master_params(module)
    saved = [p.data for p in params]
    try:
        for p, m in zip(params, masters):
            p.data = m
        yield module
    finally:
        for p, d in zip(params, saved):
            p.data = d


class MasterWeights:
    """The fp32 master weights this rank holds: its partition of the optimizer's flat fp32 groups when DeepSpeed
    keeps them (ZeRO 1-3, and bf16 at ZeRO-0), else the module's own fp32 parameters (fp32 at ZeRO-0). A per-rank
    EMA of `tensors()` needs no collective per step; `gather` and `scatter` map such per-rank tensors to and from
    full parameters by name (a collective with several ranks: at checkpoints and exports only), by letting the
    optimizer's partitions hold them for a moment and reading or writing them through DeepSpeed's public
    safe_get_full_fp32_param / safe_set_full_fp32_param."""

    # DeepSpeedZeroOptimizer (ZeRO 1-2), BF16_Optimizer (bf16 at ZeRO-0), DeepSpeedZeroOptimizer_Stage3
    PARTITIONS = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat")

    def __init__(self, engine):
        self.module, opt = engine.module, engine.optimizer
        self.partitions = next((list(getattr(opt, a)) for a in self.PARTITIONS if getattr(opt, a, None)), None)
        self.names = [n for n, _ in self.module.named_parameters()]

    def tensors(self):
        """This rank's fp32 masters (the same tensors, in the same order, at every call)."""
        return self.partitions if self.partitions is not None else [p.detach() for p in self.module.parameters()]

    @contextlib.contextmanager
    def _partitions_holding(self, values=None):
        saved = [t.clone() for t in self.partitions]
        if values is not None:
            torch._foreach_copy_(self.partitions, list(values))
        try:
            yield
        finally:
            torch._foreach_copy_(self.partitions, saved)

    @torch.no_grad()
    def gather(self, values):
        """Per-rank tensors shaped like tensors() -> {name: full fp32 tensor}. Collective: call on every rank."""
        if self.partitions is None:
            return {n: v.clone() for n, v in zip(self.names, values)}
        from deepspeed.utils import safe_get_full_fp32_param

        with self._partitions_holding(values):
            return {n: safe_get_full_fp32_param(p).clone() for n, p in self.module.named_parameters()}

    @torch.no_grad()
    def scatter(self, full):
        """{name: full fp32 tensor} -> this rank's tensors shaped like tensors() (no collective)."""
        missing = sorted(set(self.names) - set(full))
        if missing:
            raise KeyError(f"state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if self.partitions is None:
            return [full[n].detach().float().clone().to(p.device) for n, p in self.module.named_parameters()]
        from deepspeed.utils import safe_set_full_fp32_param

        with self._partitions_holding():
            for n, p in self.module.named_parameters():
                safe_set_full_fp32_param(p, full[n].float())
            return [t.clone() for t in self.partitions]


class LogWindow:
    """What the loop adds up on the device between two log rows (no host sync until the row is made)."""

    def __init__(self, device, start):
        self.loss_sum = torch.zeros((), device=device)
        self.skipped = 0  # micro-batches skipped as non-finite over the whole invocation
        self.reset(start)

    def reset(self, start):
        self.loss_sum.zero_()
        self.metric_sums, self.skipped_since_log = {}, 0
        self.start, self.tick = start, time.time()


def saved_world_size(ckpt_dir):
    """The number of ranks a DeepSpeed checkpoint's optimizer is partitioned over (one file per rank; 0: not
    partitioned, ZeRO-0 fp32, which loads on any number of ranks)."""
    return len(list(Path(ckpt_dir).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def to_universal(ckpt_dir, out_root):
    """A checkpoint partitioned over another number of ranks -> DeepSpeed's universal checkpoint of it (one file
    per parameter and optimizer state, loadable on any number of ranks) at <out_root>/<tag>. Rank 0 only."""
    out = Path(out_root) / Path(ckpt_dir).name
    if (out / "zero").is_dir():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(f"checkpoint {ckpt_dir} could not be converted to a universal checkpoint for another "
                              f"number of ranks: {tail[0]}")
    return out


class Trainer:
    def __init__(self, cfg, task, resume=None, overwrite=False, allow_config_change=False):
        """`resume`: None (a fresh run), 'auto' or a checkpoint folder; `overwrite`, `allow_config_change`: what
        usp_fast.run_folder.choose_start permits."""
        import deepspeed

        self.cfg, self.task = cfg, task
        self.rank, self.world, self.device = dist.init()
        self.run_dir = run_dir(cfg.run)
        self.ckpt_root = checkpoint_root(self.run_dir)
        self.lock, ckpt = self._open_run_folder(resume, overwrite, allow_config_change)
        self.dtype = compute_dtype(cfg, self.device)
        if self.device.type == "cuda" and self.dtype == torch.float32:  # fp32 recipe: TF32 matmuls, as DiT/SiT
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.run.seed)  # model init; all later randomness comes from per-step generators

        ds_config = deepspeed_config(cfg, self.world, self.dtype)  # refuses a contradicting pass-through early
        self.data = self._data_source(cfg)  # a LatentCache, or an OnlineSource holding the frozen VAE
        t = cfg.train
        self.plan = StreamPlan(len(self.data), cfg.run.seed, t.global_batch, t.micro_batch, self.world, self.rank,
                               flip=cfg.data.flip, views=self.manifest.get("views", 1), drop_last=t.drop_last)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.total_steps = math.ceil(t.epochs * self.steps_per_epoch)
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.base_lr = base_lr(cfg.optim, t.global_batch)

        self.latent_norm = task.latent_norm(self.manifest)  # the run's one normalisation: exports record it
        model = task.build_model(self.manifest, self.latent_norm).to(self.device)
        if t.activation_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ConfigError(f"train.activation_checkpointing: the {task.name} stage's model has no "
                                  "activation checkpointing; set it to false")
            model.set_grad_checkpointing(True)
        optimizer = task.build_optimizer(task.param_groups(model), self.base_lr)
        saved_world = saved_world_size(ckpt) if ckpt is not None else 0
        if saved_world and saved_world != self.world:  # resume on another number of ranks
            log.info("checkpoint %s holds %d optimizer partitions, this run has %d ranks: loading it as a universal "
                     "checkpoint", ckpt, saved_world, self.world)
            if dist.is_main():
                to_universal(ckpt, self.ckpt_root / UNIVERSAL)
            dist.barrier()
            ckpt = self.ckpt_root / UNIVERSAL / ckpt.name
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if t.compile:  # in place: parameter names, checkpoints and exports stay those of the plain module
            self.engine.compile(backend=t.compile_backend)
        if t.compile or t.activation_checkpointing:
            log.info("activation checkpointing %s, torch.compile %s", "on" if t.activation_checkpointing else "off",
                     t.compile_backend if t.compile else "off")
        task.attach(self.engine)
        self.start_step = 0
        if ckpt is not None:
            self._load(ckpt)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            truncate_metrics(self.run_dir, self.start_step)  # rows past the start are written again
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            atomic_write_text(self.run_dir / LatentNorm.FILE, json.dumps(self.latent_norm.as_dict()))
            log.info("%s: %d %s, %d ranks, global batch %d (micro %d x accum %d), %.2f steps/epoch, "
                     "%d steps, base lr %.3g, %s on %s, ZeRO %d", task.name, len(self.data),
                     "latents" if cfg.data.source == "cache" else "images (online encode)", self.world,
                     t.global_batch, t.micro_batch, self.plan.accum, self.steps_per_epoch, self.total_steps,
                     self.base_lr, str(self.dtype).replace("torch.", ""), self.device.type, t.zero_stage)

    def _open_run_folder(self, resume, overwrite, allow_config_change):
        """Rank 0 locks the run folder and chooses the checkpoint to start from (usp_fast.run_folder); every rank
        gets its choice, or its error. -> (the lock or None, checkpoint path or None)."""
        lock = ckpt = error = None
        if dist.is_main():
            try:
                lock = RunLock(self.run_dir)
                ckpt = choose_start(self.run_dir, resume, overwrite, allow_config_change, to_dict(self.cfg))
            except UserError as e:
                if lock is not None:
                    lock.release()
                error = e
        ckpt, message = dist.broadcast_from_main((ckpt, None if error is None else str(error)))
        if error is not None:
            raise error
        if message is not None:  # the other ranks stop too; the command line prints rank 0's line only
            raise RunFolderError(message)
        return lock, ckpt

    def close(self):
        """Release the run folder (the end of train(); a Trainer that never trains releases it when collected)."""
        if self.lock is not None:
            self.lock.release()

    def _data_source(self, cfg):
        """Sets self.manifest (what the task builds its model from) and returns the sample source: the stage's own
        (Stage.data_source, e.g. segment's image + mask pairs), else the online source or the latent cache."""
        own = self.task.data_source(self.device)
        if own is not None:
            source, self.manifest = own
            return source
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
        cache, self.manifest = open_cache(cache_dir, cfg)
        return cache

    # ---- checkpoints ----
    def _save(self, step):
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        tag = checkpoint_tag(step)
        client = {"step": step, "task": self.task.state_dict(),  # the info lets ds_to_universal convert it
                  UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        try:
            with disk_full_is_one_line(self.ckpt_root, f"checkpoint {tag}"):
                self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state=client)
        except UserError:
            shutil.rmtree(self.ckpt_root / tag, ignore_errors=True)  # unfinished: give the space back
            raise
        dist.barrier()
        if dist.is_main():
            write_complete_marker(self.ckpt_root / tag, step)
            prune_checkpoints(self.ckpt_root, step, self.cfg.train.keep_last)
            shutil.rmtree(self.ckpt_root / UNIVERSAL, ignore_errors=True)  # converted copies: this world has its own
            log.info("checkpoint %s", self.ckpt_root / tag)
            self._plot()
        dist.barrier()

    def _plot(self):
        """<run>/loss.png from metrics.jsonl (rank 0, at each checkpoint and at the end)."""
        rows = read_metrics(self.run_dir)
        if rows:
            plot_training_curves(rows, self.run_dir / "loss.png", f"{self.cfg.run.name} ({self.task.name})")

    def _load(self, path):
        try:
            _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        except Exception as e:  # DeepSpeed's own errors name no file
            raise CheckpointError(f"checkpoint {path} could not be loaded: {type(e).__name__}: {e}") from e
        if client is None:
            raise CheckpointError(f"checkpoint {path} could not be loaded (DeepSpeed returned no client state)")
        self.start_step = int(client["step"])
        self.task.load_state_dict(client.get("task", {}))
        if dist.is_main():
            log.info("resumed from %s at step %d", path, self.start_step)

    # ---- non-finite values ----
    def _nonfinite(self, loss_sum):
        """-> a description of what is non-finite (loss since the last check, last grad-norm, weights), or None.
        A host sync: called at log intervals, before checkpoints and before the end only."""
        bad = []
        if not bool(torch.isfinite(dist.mean_across_ranks(loss_sum)).item()):
            bad.append("loss")
        gn = self.engine.get_global_grad_norm()
        if gn is not None and not math.isfinite(float(gn)):
            bad.append("grad-norm")
        if self.cfg.train.zero_stage != 3:  # ZeRO-3 holds only partitions here; the loss check covers it
            params = [p.detach() for p in self.engine.module.parameters()]
            finite = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
            if not bool(dist.mean_across_ranks(finite.float()).item() == 1.0):
                bad.append("weights")
        return " and ".join(bad) or None

    def _stop_nonfinite(self, what, lo, hi):
        good = complete_checkpoints(self.ckpt_root)
        last = f"the last good checkpoint {good[-1][1]} is intact" if good else "no checkpoint was written"
        raise TrainingDiverged(f"non-finite {what} between steps {lo + 1} and {hi} of {self.task.name}: stopped "
                               f"without saving ({last}); lower optim.lr, set optim.grad_clip, or use "
                               "train.nonfinite=skip")

    # ---- the loop ----
    def _loader(self):
        if hasattr(self.data, "stream"):  # online sources: decoded and encoded ahead by a background thread
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
        out = {"latents": self.latent_norm.normalize(mean).to(self.dtype)}
        if self.task.needs_labels:
            out["labels"] = batch["labels"].to(self.device, non_blocking=True)
        return out

    def train(self):
        """Steps from start_step to the end of this invocation: step, then (at log intervals) log and check, then
        save on the checkpoint cadence; a final checkpoint, then the stage's exports. -> the stage's result."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self):
        t = self.cfg.train
        end = self.total_steps if t.run_steps is None else min(self.total_steps, self.start_step + t.run_steps)
        window = LogWindow(self.device, self.start_step)
        checked = self.start_step  # steps up to here are known finite
        batches = iter(self._loader())
        gen = torch.Generator(device=self.device)
        with self._outputs() as (writer, bar, audit):
            self.engine.train()
            for step in range(self.start_step, end):
                lr = self._step(step, batches, gen, window, audit)
                done = step + 1
                bar.update(1)
                saving = done % t.ckpt_every == 0 and done < end
                if done % t.log_every == 0 or done == end or saving:  # the only host syncs
                    bad = self._nonfinite(window.loss_sum)
                    if done % t.log_every == 0 or done == end or bad:
                        row = self._metrics_row(done, lr, window)
                        if dist.is_main():
                            self._log(row, writer, bar)
                        window.reset(done)
                    if bad:
                        self._stop_nonfinite(bad, checked, done)
                    checked = done
                if saving:
                    self._save(done)
        if end > self.start_step or not complete_checkpoints(self.ckpt_root):
            self._save(end)
        if end < self.total_steps:
            log.info("stopped at step %d of %d (train.run_steps); continue with --resume auto", end, self.total_steps)
            return {"stopped_at": end}
        return self._finish()

    @contextlib.contextmanager
    def _outputs(self):
        """What the loop writes besides checkpoints: TensorBoard and the progress bar (rank 0), and the optional
        per-rank sample audit; closed however the loop ends."""
        main, t = dist.is_main(), self.cfg.train
        writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(self.run_dir / "tb"))
        bar = progress_bar(total=self.total_steps, initial=self.start_step, desc=self.task.name, unit="step",
                           disable=not main)
        audit = open(self.run_dir / f"samples_r{self.rank}.txt", "a") if t.audit_samples else None
        try:
            yield writer, bar, audit
        finally:
            bar.close()
            if audit is not None:
                audit.close()
            if writer is not None:
                writer.close()

    def _step(self, step, batches, gen, window, audit):
        """One optimizer step: the scheduled lr, then `accum` micro-steps of forward + backward (DeepSpeed steps
        the optimizer on the last). Loss and metrics add up on the device in `window`. -> the lr."""
        cfg = self.cfg
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
            if cfg.train.nonfinite == "skip" and not bool(torch.isfinite(loss).item()):  # the opt-in per-micro sync
                window.skipped, window.skipped_since_log = window.skipped + 1, window.skipped_since_log + 1
                # a zero-gradient loss keeps DeepSpeed's backward hooks and accumulation count intact
                loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters() if p.requires_grad)
                metrics = {}
            else:
                window.loss_sum += loss.detach().float()
            self.engine.backward(loss)
            self.engine.step()
            for k, v in metrics.items():
                window.metric_sums[k] = window.metric_sums.get(k, 0) + v.detach().float()
        self.task.after_step(self.engine.module, step)
        return lr

    def _metrics_row(self, done, lr, window):
        """The log row of the steps since the last one, averaged over micro-steps and ranks (host syncs)."""
        t = self.cfg.train
        n = max((done - window.start) * self.plan.accum - window.skipped_since_log, 1)
        row = {"step": done, "epoch": done / self.steps_per_epoch,
               "loss": dist.mean_across_ranks(window.loss_sum / n).item(), "lr": lr}
        for k, v in window.metric_sums.items():
            row[k] = dist.mean_across_ranks(v / n).item()
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            row["grad_norm"] = float(gn)
        if t.nonfinite == "skip":
            row["nonfinite_skipped"] = window.skipped
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        row["img_per_s"] = (done - window.start) * t.global_batch / max(time.time() - window.tick, 1e-9)
        return row

    def _log(self, row, writer, bar):
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(f"{self.task.name}/{k}", v, row["step"])
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", ips=f"{row['img_per_s']:.0f}", refresh=False)
        log.info(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def _finish(self):
        import deepspeed

        module = self.engine.module
        epoch = self.total_steps / self.steps_per_epoch
        self.task.collect()  # every rank: rank-partitioned state (the EMA) comes together for the exports
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=self.cfg.train.zero_stage == 3):
            with fp32_master_weights(module), disk_full_is_one_line(self.run_dir, "the exports"):
                # exports carry the fp32 masters, not the bf16 module weights
                result = self.task.finish(module, self.run_dir, self.manifest, self.latent_norm, self.total_steps,
                                          epoch) \
                    if dist.is_main() else {}
        dist.barrier()
        return result
