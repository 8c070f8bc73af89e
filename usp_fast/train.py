"""usp-fast entry point: `deepspeed usp_fast/train.py --stage STAGE --config FILE [key=value ...]`
(or plain `python usp_fast/train.py ...` for one process).

Stages: cache (build the latent cache), pretrain (USP masked latent modelling), generate (DiT/SiT training),
probe and finetune (understanding).
"""
import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from usp_fast import dist  # noqa: E402
from usp_fast.config import ConfigError, load_config  # noqa: E402

log = logging.getLogger("usp_fast")

STAGES = {
    "pretrain": "usp_fast.pretrain:PretrainTask",
    "generate": "usp_fast.generate:GenerateTask",
    "probe": "usp_fast.probe:ProbeTask",
    "finetune": "usp_fast.finetune:FinetuneTask",
}


def load_task_class(stage):
    module, name = STAGES[stage].split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise SystemExit(f"--stage {stage} is not available in this version of usp-fast") from e
        raise


def setup_logging(rank, run_dir=None):
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "train.log"))
    logging.basicConfig(level=level, format=f"%(asctime)s [r{rank}] %(name)s: %(message)s", handlers=handlers,
                        force=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["cache", *STAGES])
    p.add_argument("--config", required=True, help="YAML config (configs/<stage>/<name>.yaml)")
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint) or a checkpoint folder")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def prepare_data(cfg, rank, world, device, build_missing):
    """Demo images if asked for, then the latent cache: built by --stage cache, or by a training stage when
    data.auto_cache is set; otherwise the training stage refuses a missing or partial cache."""
    from usp_fast.data.cache import build_cache, cache_status, default_cache_dir
    from usp_fast.data.demo import make_demo_imagefolder
    from usp_fast.vae import load_vae

    if cfg.data.demo_images:
        if rank == 0:
            make_demo_imagefolder(cfg.data.root, cfg.data.demo_images, seed=cfg.run.seed)
        dist.barrier()
    cache_dir = default_cache_dir(cfg)
    if build_missing and cache_status(cache_dir) != "complete":
        vae = load_vae(cfg.vae.name, cfg.vae.scale, device=device)
        build_cache(cfg, vae, device, rank, world, barrier=dist.barrier)
    return cache_dir


def main(argv=None):
    args = parse_args(argv)
    stage = args.stage
    extra = {} if stage in ("cache", "pretrain") else load_task_class(stage).schema
    try:
        cfg = load_config(args.config, args.overrides, extra=extra)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from e
    rank = int(os.environ.get("RANK", 0))
    setup_logging(rank, Path(cfg.run.out_dir) / cfg.run.name)
    rank, world, device = dist.init()
    online = cfg.data.source == "online"  # images are encoded per step: no cache to build or check
    prepare_data(cfg, rank, world, device, build_missing=stage == "cache" or (cfg.data.auto_cache and not online))
    if stage == "cache":
        return {}
    if stage == "probe":  # trains heads on features extracted once, not on the per-step stream: no engine
        from usp_fast.probe import run as run_probe
        result = run_probe(cfg, device) if rank == 0 else {}  # single process: other ranks only wait
        dist.barrier()
        return result
    task_cls = load_task_class(stage)
    from usp_fast.engine import Trainer
    result = Trainer(cfg, task_cls(cfg), resume=args.resume).train()
    if rank == 0:
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        print(f"\nDone. Run directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tb'})"
              f"\n  checkpoints: {run_dir / 'checkpoints'}")
        for k, v in (result or {}).items():
            print(f"  {k}: {v}")
    return result


if __name__ == "__main__":
    main()
