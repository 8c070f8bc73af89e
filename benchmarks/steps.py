"""The `steps` suite: whole training steps (forward, backward, optimizer, EMA where the stage has one).

Cases: pretrain USP ViT-B/L/XL at per-GPU batch 128 and 256, and generate DiT/SiT-B/L/XL/2 at batch 32 to 256, on
random latents already on the device (the "cached latents" path; reading the cache is the data suite's concern).
Each case runs three implementations of the bare model in one run (rows <case>/<impl>):
  usp-fast           USP_FAST_KERNELS=auto (Triton on CUDA), attention through usp_fast.models.attention
                     (FlashAttention-3 on Hopper, else FlashAttention-2, else SDPA: the row records which), eager
  reference          USP_FAST_KERNELS=reference (the PyTorch reference ops), SDPA, eager
  reference+compile  the same under torch.compile (skipped on CPU)
A bare step: the stage's loss (the model's norm-pix MSE; DiT/SiT: label dropout + the objective's training_loss,
as GenerateStage.loss), backward, AdamW (fused on CUDA) with the configs' hyper-parameters, an EMA of the module's
weights. DeepSpeed is bypassed there, so the implementations compare under identical optimizer math: its
single-GPU bf16 mode is emulated (bf16 weights for forward/backward, fp32 masters and gradients for AdamW, the
updated masters copied back).

And the step users run (rows <case>/engine, usp-fast kernels on a GPU): usp_fast.engine.Trainer's own per-step code
(EngineStep: Trainer._step, DeepSpeed's engine built from the stage and engine.deepspeed_config as Trainer.__init__
builds it: bf16 masters, ZeRO, gradient accumulation, the stage's after_step = the generate stage's EMA of the fp32
master partitions), with `ema_ms` (the stage's after_step timed inside each step), `ema_share` (of the step) and
`step_ms_without_ema` beside. Generate cases add <case>/ema-before: the EMA as it was before it moved to the master
partitions, one safe_get_full_fp32_param per parameter (zeros + copy + all_reduce each) then the update, timed on
the same engine, with its share of a step that ran it. `python benchmarks/steps.py` runs the engine rows alone, under
any launcher (e.g. `torchrun --nproc_per_node 2` on CPU: the EMA's share with 2 ranks).

Timing: warm-up steps (compilation happens there), then each timed step between CUDA events (wall clock on CPU);
the median. Peak memory: the largest allocation over warm-up and timed steps (weights, masters, optimizer state,
EMA, activations). MFU: analytic training FLOPs (benchmarks/flops.py, 3 x forward) x img/s over the peak bf16
FLOP/s measured in the same run by a large matmul (the datasheet peaks are in env.py).
"""
import argparse
import contextlib
import gc
import itertools
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import torch

import usp_fast_kernels as kernels
from usp_fast.engine import LogWindow, Trainer, compute_dtype, deepspeed_config
from usp_fast_benchmarks import flops
from usp_fast_benchmarks.env import DATASHEET_BF16_TFLOPS, device_name
from usp_fast.diffusion import create_objective, default_objective
from usp_fast.ema import EMA
from usp_fast.models import attention, dit, usp_vit
from usp_fast.models.dit import drop_labels
from usp_fast.optim import decay_groups

PRETRAIN_MODELS, PRETRAIN_BATCHES = ("usp_vit_b", "usp_vit_l", "usp_vit_xl"), (128, 256)
GENERATE_MODELS = tuple(f"{family}-{size}/2" for family in ("DiT", "SiT") for size in ("B", "L", "XL"))
GENERATE_BATCHES = (32, 64, 128, 256)

# AdamW settings of configs/pretrain/vit_*.yaml and configs/generate/*.yaml (lr, weight decay, betas); the lr value
# does not change the step time, weight decay on or off does (a little).
OPTIM = {"pretrain": dict(lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95)),
         "generate": dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999))}
EMA_DECAY = 0.9999
CLASS_DROPOUT = 0.1


@dataclass(frozen=True)
class Case:
    stage: str          # 'pretrain' or 'generate'
    model: str          # registry name
    batch: int          # per-GPU batch
    overrides: tuple = ()  # model config overrides, as (key, value) pairs
    tag: str = ""          # names a variant of the registry model (e.g. 'usp-init')

    @property
    def name(self):
        return f"{self.stage}/{self.model}/b{self.batch}" + (f"/{self.tag}" if self.tag else "")

    def config(self):
        build = usp_vit.model_config if self.stage == "pretrain" else dit.model_config
        return build(self.model, **dict(self.overrides))

    def flops(self):
        return (flops.usp_vit if self.stage == "pretrain" else flops.dit)(self.config())


# A USP-initialised DiT keeps the ViT's LayerNorm affine and exact GELU (the transfer's defaults), so its steps run
# the adaLN kernels' weight/bias gradient paths that DiT's affine-free LayerNorm never takes.
USP_INIT = (("norm_affine", True), ("mlp_act", "gelu"))


def paper_cases():
    return ([Case("pretrain", m, b) for m in PRETRAIN_MODELS for b in PRETRAIN_BATCHES]
            + [Case("generate", m, b) for m in GENERATE_MODELS for b in GENERATE_BATCHES]
            + [Case("generate", "DiT-XL/2", b, USP_INIT, tag="usp-init") for b in (32, 256)])


def tiny_cases():
    """CPU smoke shapes: 8x8 latents (16 patches), the registry's test-sized models."""
    small = (("input_size", 8),)
    return [Case("pretrain", "usp_vit_test", 2, small),
            Case("generate", "DiT-Test/2", 2, small + (("num_classes", 10),)),
            Case("generate", "SiT-Test/2", 2, small + (("num_classes", 10),))]


def select_cases(ctx, cases):
    """Cases whose name (e.g. 'generate/DiT-XL/2/b32') matches ctx.cases, a regex (all when unset)."""
    pattern = getattr(ctx, "cases", None)
    return [c for c in cases if not pattern or re.search(pattern, c.name)]


# ---- implementations ----

@dataclass(frozen=True)
class Impl:
    name: str
    kernels: str       # USP_FAST_KERNELS value
    force_sdpa: bool   # bypass flash-attn even when installed
    compile: bool


IMPLS = (Impl("usp-fast", "auto", False, False), Impl("reference", "reference", True, False),
         Impl("reference+compile", "reference", True, True))


@contextlib.contextmanager
def implementation(impl, on_gpu):
    """Switch the kernels dispatch and the attention picker for the duration of one case. On CPU the usp-fast
    implementation forces the Triton kernels (through the interpreter run.py enables) so that the smoke run goes
    through them; 'auto' would pick the references there."""
    value = "triton" if impl.kernels == "auto" and not on_gpu else impl.kernels
    saved_env = os.environ.get(kernels.ENV_VAR)
    os.environ[kernels.ENV_VAR] = value
    try:
        with attention.only("sdpa") if impl.force_sdpa else contextlib.nullcontext():
            yield
    finally:
        if saved_env is None:
            os.environ.pop(kernels.ENV_VAR, None)
        else:
            os.environ[kernels.ENV_VAR] = saved_env


# ---- the training step ----

class TrainStep:
    """One optimizer step of `case` on fixed random latents (and labels), callable; returns the loss tensor."""

    def __init__(self, case, device, dtype, compile_model):
        cfg = case.config()
        self.case, self.device = case, device
        self.model = (usp_vit.USPViT(cfg) if case.stage == "pretrain" else dit.DiT(cfg)).to(device)
        groups = decay_groups(self.model, OPTIM[case.stage]["weight_decay"])
        self.params = [p for g in groups for p in g["params"]]
        if dtype == torch.float32:
            self.masters = None
            opt_groups = groups
        else:  # DeepSpeed-style bf16: fp32 masters and gradient buffers hold what AdamW updates
            self.model.to(dtype)
            self.masters = {p: p.detach().float() for p in self.params}
            for m in self.masters.values():
                m.grad = torch.zeros_like(m)
            opt_groups = [{**g, "params": [self.masters[p] for p in g["params"]]} for g in groups]
        o = OPTIM[case.stage]
        self.optimizer = torch.optim.AdamW(opt_groups, lr=o["lr"], betas=o["betas"], fused=device.type == "cuda")
        self.ema = EMA(self.model, EMA_DECAY) if case.stage == "generate" else None
        self.forward_model = torch.compile(self.model) if compile_model else self.model

        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(0)
        C, side = (cfg.in_chans, cfg.input_size) if case.stage == "pretrain" else (cfg.in_channels, cfg.input_size)
        self.latents = torch.randn(case.batch, C, side, side, generator=self.gen, device=device).to(dtype)
        if case.stage == "generate":
            self.labels = torch.randint(0, cfg.num_classes, (case.batch,), generator=self.gen, device=device)
            self.objective = create_objective(default_objective(cfg.family), cfg.learn_sigma)
            self.null_class = cfg.null_class

    def loss(self):
        if self.case.stage == "pretrain":  # PretrainStage.loss
            return self.forward_model(self.latents, generator=self.gen)[0]
        labels = drop_labels(self.labels, CLASS_DROPOUT, self.null_class, self.gen)  # GenerateStage.loss
        return self.objective.training_loss(self.forward_model, self.latents, labels, self.gen)[0]

    def __call__(self):
        loss = self.loss()
        loss.backward()
        if self.masters is None:
            self.optimizer.step()
        else:
            with torch.no_grad():
                masters = list(self.masters.values())
                torch._foreach_copy_([m.grad for m in masters], [p.grad for p in self.params])
                self.optimizer.step()
                torch._foreach_copy_(self.params, masters)
        for p in self.params:
            p.grad = None
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()


# ---- the training step through the engine ----

class EngineStep(Trainer):
    """Trainer's per-step code over fixed random latents: `step()` is Trainer._step (with Trainer._latents), one
    optimizer step of `accum` micro-batches of `case.batch`. The engine is built from the same parts as in
    Trainer.__init__ (the stage's build_model / build_optimizer / attach, engine.deepspeed_config of a run config
    of the case); this __init__ replaces the data cache, the run folder and checkpoints, nothing a step runs."""

    def __init__(self, case, accum=1, zero_stage=1, work_dir=None):
        import tempfile

        import deepspeed

        from usp_fast import dist
        from usp_fast.optim import base_lr
        from usp_fast.stages import load_config, stage_class

        self.rank, self.world, self.device = dist.init()
        self._tmp = tempfile.TemporaryDirectory() if work_dir is None else None  # generator.json goes there
        cfg = case.config()
        self.cfg = load_config(None, engine_overrides(case, cfg, accum, self.world, zero_stage,
                                                      work_dir or self._tmp.name), stage=case.stage)
        self.task = stage_class(case.stage)(self.cfg)
        self.dtype = compute_dtype(self.cfg, self.device)
        torch.manual_seed(self.cfg.run.seed)  # model init, as Trainer.__init__
        self.manifest = {"latent_channels": cfg.in_chans if case.stage == "pretrain" else cfg.in_channels,
                         "latent_size": cfg.input_size, "num_classes": getattr(cfg, "num_classes", 0),
                         "class_names": None, "resolution": 8 * cfg.input_size, "vae": {"name": "benchmark"}}
        self.latent_norm = self.task.latent_norm(self.manifest)
        self.plan = SimpleNamespace(accum=accum)
        self.steps_per_epoch, self.total_steps = 10**6, 10**7  # the lr schedule's position: no effect on time
        self.base_lr = base_lr(self.cfg.optim, self.cfg.train.global_batch)
        model = self.task.build_model(self.manifest, self.latent_norm).to(self.device)
        optimizer = self.task.build_optimizer(self.task.param_groups(model), self.base_lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(self.cfg, self.world, self.dtype))
        self.task.attach(self.engine)
        self.engine.train()
        self.lock = None

        gen = torch.Generator(device=self.device)
        gen.manual_seed(1000 + self.rank)
        C, side = self.manifest["latent_channels"], cfg.input_size
        mean = torch.randn(case.batch, C, side, side, generator=gen, device=self.device)
        self.raw = {"mean": mean, "std": torch.full_like(mean, 0.1)}  # as the cache gives them, on the device
        if self.task.needs_labels:
            self.raw["labels"] = torch.randint(0, cfg.num_classes, (case.batch,), generator=gen, device=self.device)
        self.gen = torch.Generator(device=self.device)
        self.window = LogWindow(self.device, 0)
        self.step_count = 0
        self.ema_on = True
        self.ema_times = []  # per step: (start, end) events on CUDA, else seconds
        stage_after_step = self.task.after_step

        def after_step(model, step):  # the stage's own, timed; skipped while ema_on is False
            if not self.ema_on:
                return
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                stage_after_step(model, step)
                end.record()
                self.ema_times.append((start, end))
            else:
                t0 = time.perf_counter()
                stage_after_step(model, step)
                self.ema_times.append(time.perf_counter() - t0)

        self.task.after_step = after_step

    def step(self):
        """One optimizer step exactly as training runs it. -> the mean loss of its micro-batches (a tensor)."""
        self.window.loss_sum.zero_()
        self._step(self.step_count, itertools.repeat(self.raw), self.gen, self.window, None)
        self.step_count += 1
        return self.window.loss_sum / self.plan.accum

    __call__ = step

    def ema_ms(self):
        """Median milliseconds of the stage's after_step over the steps timed so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in self.ema_times)
        return statistics.median(self.ema_times) * 1e3

    def ema_before(self):
        """The EMA update as the generate stage did it before MasterWeights: every parameter's full fp32 master
        gathered by safe_get_full_fp32_param (on several ranks a zeros + copy + all_reduce each; bf16 training ran
        it for every parameter, the fp32 path for none), then one foreach update of a full-size shadow."""
        from deepspeed.utils import safe_get_full_fp32_param

        if not hasattr(self, "_old_shadow"):
            self._old_shadow = [p.detach().float().clone() for p in self.engine.module.parameters()]
        with torch.no_grad():
            full = [safe_get_full_fp32_param(p) for p in self.engine.module.parameters()]
            full = [f if f is not None else p.detach().float() for f, p in zip(full, self.engine.module.parameters())]
            torch._foreach_lerp_(self._old_shadow, full, 1.0 - self.cfg.ema.decay)

    def close(self):
        if self._tmp is not None:
            self._tmp.cleanup()


def engine_overrides(case, cfg, accum, world, zero_stage, out_dir):
    """The run config of `case`'s engine: its model, the configs' optimizer settings (OPTIM), a global batch of
    batch x accum x ranks, the identity latent normalisation (the latents are random already)."""
    o = OPTIM[case.stage]
    out = [f"run.out_dir={out_dir}", "run.name=steps", f"model.name={case.model}", f"optim.lr={o['lr']}",
           f"optim.weight_decay={o['weight_decay']}", f"optim.betas=[{o['betas'][0]},{o['betas'][1]}]",
           "optim.warmup_epochs=0", "optim.schedule=constant", f"train.micro_batch={case.batch}",
           f"train.global_batch={case.batch * accum * world}", f"train.zero_stage={zero_stage}", "vae.normalize=none"]
    if case.stage == "generate":
        out += [f"ema.decay={EMA_DECAY}", "generate.init=random", f"generate.class_dropout_prob={CLASS_DROPOUT}",
                f"generate.norm_affine={str(cfg.norm_affine).lower()}", f"generate.mlp_act={cfg.mlp_act}",
                f"generate.learn_sigma={str(cfg.learn_sigma).lower()}"]
    return out


def measure_engine(ctx, case, peak, accum=1, impl=None):
    """Rows '<case>/engine' and, for a stage with an EMA, '<case>/ema-before' (see the module docstring). Kernels:
    usp-fast on a GPU; the references on CPU, where the Triton interpreter would make each step ~10x slower and
    hide the engine's own costs (the bare usp-fast rows run the kernels there)."""
    impl = impl or (IMPLS[0] if ctx.on_gpu else IMPLS[1])
    warmup, repeats = (ctx.warmup, ctx.repeats) if ctx.on_gpu else (1, max(2, getattr(ctx, "engine_repeats", 2)))
    with implementation(impl, ctx.on_gpu):
        step = None
        try:
            if ctx.on_gpu:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            step = EngineStep(case, accum=accum)
            has_ema = case.stage == "generate"
            step.ema_times.clear()
            ms = median_ms(ctx.on_gpu, step, warmup, repeats)
            ema_ms = step.ema_ms() if has_ema else None
            step.ema_on = False
            without = median_ms(ctx.on_gpu, step, 0, repeats) if has_ema else None
            step.ema_on = True
            loss = float(step().item())
            peak_gib = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.on_gpu else None
            before_ms = median_ms(ctx.on_gpu, step.ema_before, 1, repeats) if has_ema else None
            row = {"impl": "engine", "kernels": kernels.backend(step.raw["mean"], "patch_norm_mse"),
                   "attention": attention.last_backend, "compiled": False, "dtype": str(step.dtype)[6:],
                   "world": step.world, "accum": accum, "zero_stage": step.cfg.train.zero_stage}
        except RuntimeError as e:
            if "out of memory" not in str(e):
                raise
            return {f"{case.name}/engine": {"impl": "engine", "oom": True}}
        finally:
            if step is not None:
                step.close()
            del step
            _release()
    images = case.batch * accum
    achieved = case.flops().train * images / ms / 1e9
    rows = {f"{case.name}/engine": {
        **row, "step_ms": ms, "img_per_s": images / ms * 1e3, "achieved_tflops": achieved,
        "mfu": achieved / peak["datasheet_tflops"] if ctx.on_gpu and peak.get("datasheet_tflops") else None,
        "peak_gib": peak_gib, "final_loss": loss, "ema_ms": ema_ms,
        "ema_share": ema_ms / ms if has_ema else None, "step_ms_without_ema": without}}
    if has_ema:
        rows[f"{case.name}/ema-before"] = {
            "impl": "ema-before", "kernels": row["kernels"], "attention": row["attention"], "world": row["world"],
            "ema_ms": before_ms, "step_ms": without + before_ms,  # a step that ran the old EMA instead
            "ema_share": before_ms / (without + before_ms), "img_per_s": images / (without + before_ms) * 1e3,
            "how": "safe_get_full_fp32_param of every parameter + one foreach lerp, on the engine above; step_ms: "
                   "that engine's step without EMA + this"}
    return rows


# ---- timing ----

def median_ms(on_gpu, fn, warmup, repeats):
    """Median milliseconds of fn() after `warmup` untimed calls: CUDA events around each call (one sync at the
    end, so calls queue as in training), wall clock on CPU."""
    for _ in range(warmup):
        fn()
    if not on_gpu:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


@lru_cache(maxsize=None)
def _matmul_peak(device_type, n, dtype):
    a = torch.randn(n, n, device=device_type).to(dtype)
    b = torch.randn(n, n, device=device_type).to(dtype)
    on_gpu = device_type == "cuda"
    ms = median_ms(on_gpu, lambda: a @ b, warmup=5 if on_gpu else 1, repeats=50 if on_gpu else 3)
    return 2 * n**3 / ms / 1e9  # TFLOP/s


def peak_tflops(ctx):
    """Peak matmul TFLOP/s measured here: an 8192^3 bf16 matmul on CUDA (cached per process, so every suite of a
    run shares one figure); on CPU a small fp32 one, recorded only as a smoke value."""
    if ctx.on_gpu:
        return {"measured_tflops": _matmul_peak("cuda", 8192, torch.bfloat16), "how": "8192^3 bf16 matmul, median",
                "datasheet_tflops": DATASHEET_BF16_TFLOPS.get(device_name(ctx.device)),
                "datasheet_note": "vendor datasheet, dense bf16 (not measured)"}
    return {"measured_tflops": _matmul_peak("cpu", 256, torch.float32), "how": "256^3 fp32 matmul on CPU (smoke)",
            "datasheet_tflops": None, "datasheet_note": None}


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(ctx, case, impl, peak):
    """One row: the step time, throughput, MFU and peak memory of `case` under `impl`."""
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32  # bf16 arithmetic is broken in the Triton interpreter
    warmup, repeats = (ctx.warmup, ctx.repeats) if ctx.on_gpu else (1, 2)
    with implementation(impl, ctx.on_gpu):
        step = None
        try:
            if ctx.on_gpu:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            step = TrainStep(case, ctx.device, dtype, impl.compile)
            ms = median_ms(ctx.on_gpu, step, warmup, repeats)
            loss = step().item()
            peak_gib = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.on_gpu else None
            row = {"kernels": kernels.backend(step.latents, "patch_norm_mse"),
                   "attention": attention.last_backend, "compiled": impl.compile}
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or the same raised through compiled code
            if "out of memory" not in str(e):
                raise
            return {"oom": True}
        finally:
            del step
            if impl.compile:
                torch._dynamo.reset()
            _release()
    train_flops = case.flops().train
    img_per_s = case.batch / ms * 1e3
    achieved = train_flops * img_per_s / 1e12
    return {**row, "dtype": str(dtype).replace("torch.", ""), "step_ms": ms, "img_per_s": img_per_s,
            "train_gflop_per_img": train_flops / 1e9, "achieved_tflops": achieved,
            # MFU against the datasheet peak (the usual definition); beside it, against the matmul rate measured here
            "mfu": achieved / peak["datasheet_tflops"] if ctx.on_gpu and peak.get("datasheet_tflops") else None,
            "mfu_vs_measured_matmul": achieved / peak["measured_tflops"] if ctx.on_gpu else None, "peak_gib": peak_gib,
            "final_loss": loss}


@contextlib.contextmanager
def cpu_threads(ctx, n):
    """On CPU, run with n torch threads: the tiny smoke ops gain nothing from more, and on a shared, oversubscribed
    machine OpenMP threads waiting on each other made a tiny step 100x slower."""
    saved = torch.get_num_threads()
    if not ctx.on_gpu:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_cases(ctx, cases):
    with cpu_threads(ctx, 1):
        return _run_cases(ctx, cases)


def run_impls(ctx):
    """The implementations a run measures: torch.compile baselines only on a GPU and unless --no-compile."""
    return [i for i in IMPLS if not i.compile or (ctx.on_gpu and getattr(ctx, "compile", True))]


def engine_row_names(case):
    return [f"{case.name}/engine"] + ([f"{case.name}/ema-before"] if case.stage == "generate" else [])


def _run_cases(ctx, cases):
    peak = peak_tflops(ctx)
    impls = run_impls(ctx)
    rows = {}
    for case in cases:
        where = {"stage": case.stage, "model": case.model, "batch": case.batch}
        for impl in impls:
            rows[f"{case.name}/{impl.name}"] = {**where, "impl": impl.name, **measure(ctx, case, impl, peak)}
        if getattr(ctx, "engine", True):
            rows.update({k: {**where, **v} for k, v in measure_engine(ctx, case, peak).items()})
        if ctx.on_gpu:
            mine = rows[f"{case.name}/usp-fast"]
            for impl in impls[1:]:
                other = rows[f"{case.name}/{impl.name}"]
                if "step_ms" in mine and "step_ms" in other:
                    mine[f"speedup_vs_{impl.name}"] = other["step_ms"] / mine["step_ms"]
    return {
        "peak": peak,
        "timing": (f"median of {ctx.repeats} steps between CUDA events after {ctx.warmup} warm-up steps; "
                   "bf16 weights, fp32 AdamW masters" if ctx.on_gpu else
                   "CPU at tiny shapes, fp32, wall clock: NOT performance data; MFU not meaningful (None), no "
                   "torch.compile baseline, no speed-ups, no GPU figures"),
        "flops_convention": "matmul FLOPs, training = 3 x forward (benchmarks/flops.py)",
        "rows": rows,
    }


def steps_suite(ctx):
    cases = paper_cases() if not ctx.tiny else tiny_cases()
    result = run_cases(ctx, select_cases(ctx, cases))
    impls = IMPLS if ctx.on_gpu else [i for i in IMPLS if not i.compile]
    result["expected_rows"] = sorted([f"{c.name}/{i.name}" for c in cases for i in impls]  # what a full run has
                                     + [n for c in cases for n in engine_row_names(c)])
    return result


def main(argv=None):
    """The engine rows alone, under any launcher; rank 0 prints them and writes them as JSON (--out)."""
    parser = argparse.ArgumentParser(description="engine rows of the steps suite (see benchmarks/steps.py)")
    parser.add_argument("--cases", default="generate/DiT-Test", help="regex over the case names (tiny on CPU)")
    parser.add_argument("--kernels", default="usp-fast", choices=[i.name for i in IMPLS if not i.compile],
                        help="kernels of the engine rows (reference: no Triton interpreter on CPU)")
    parser.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-steps per step")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps (each of with / without EMA)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    parser.add_argument("--out", help="write rank 0's rows here (JSON)")
    args = parser.parse_args(argv)
    from usp_fast_benchmarks.env import environment, use_triton_interpreter_without_cuda

    use_triton_interpreter_without_cuda()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ctx = SimpleNamespace(device=device, on_gpu=device.type == "cuda", tiny=device.type != "cuda", warmup=5,
                          repeats=args.repeats, engine_repeats=args.repeats, cases=args.cases)
    impl = next(i for i in IMPLS if i.name == args.kernels)
    cases = select_cases(ctx, tiny_cases() if ctx.tiny else paper_cases())
    rows = {}
    with cpu_threads(ctx, args.threads):
        peak = peak_tflops(ctx)
        for case in cases:
            rows.update(measure_engine(ctx, case, peak, accum=args.accum, impl=impl))
    if int(os.environ.get("RANK", 0)) == 0:
        for key, row in rows.items():
            print(key, json.dumps({k: v for k, v in row.items() if k != "how"}))
        if args.out:
            ranks = int(os.environ.get("WORLD_SIZE", 1))
            launcher = f"torchrun --nproc_per_node {ranks}" if "TORCHELASTIC_RUN_ID" in os.environ else "python"
            record = {**environment(device), "ranks": ranks, "command": f"{launcher} {' '.join(sys.argv)}",
                      "kernels": args.kernels,
                      "timing": ("median over the timed steps of wall-clock time on CPU" if not ctx.on_gpu else
                                 "median over the timed steps between CUDA events"), "rows": rows}
            from pathlib import Path

            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


def fmt(value, spec=".1f"):
    """A table cell: '-' for a figure that was not measured."""
    return format(value, spec) if value is not None else "-"


def print_header(header):
    print(header)
    print("-" * len(header))


def print_steps(result, ctx):
    peak = result["peak"]
    print(f"peak matmul: {peak['measured_tflops']:.1f} TFLOP/s measured ({peak['how']}); datasheet "
          f"{fmt(peak['datasheet_tflops'], '.1f')}   ({result['timing']})")
    header = (f"{'case':<28}{'impl':<19}{'kernels':<10}{'attn':<11}{'step ms':>10}{'img/s':>10}{'MFU':>7}"
              f"{'x fast':>8}{'GiB':>8}")
    print_header(header)
    for key, row in result["rows"].items():
        case = key.rsplit("/", 1)[0]
        if row.get("oom"):
            print(f"{case:<28}{row['impl']:<19}out of memory")
            continue
        if row["impl"] in ("engine", "ema-before"):
            print(f"{case:<28}{row['impl']:<19}{row['kernels']:<10}{row['attention']:<11}{row['step_ms']:>10.2f}"
                  f"{row['img_per_s']:>10.1f}{fmt(row.get('mfu'), '.1%'):>7}{'':>8}{fmt(row.get('peak_gib'), '.1f'):>8}"
                  + (f"   EMA {row['ema_ms']:.2f} ms = {row['ema_share']:.1%} of the step, {row['world']} rank(s)"
                     if row.get("ema_ms") is not None else ""))
            continue
        ratio = None
        if ctx.on_gpu and row["impl"] != "usp-fast":
            ratio = result["rows"][f"{case}/usp-fast"].get(f"speedup_vs_{row['impl']}")
        print(f"{case:<28}{row['impl']:<19}{row['kernels']:<10}{row['attention']:<11}{row['step_ms']:>10.2f}"
              f"{row['img_per_s']:>10.1f}{fmt(row['mfu'], '.1%'):>7}{fmt(ratio, '.2f'):>8}"
              f"{fmt(row['peak_gib'], '.1f'):>8}")


if __name__ == "__main__":
    sys.exit(main())
