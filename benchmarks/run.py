"""Benchmark suites. `python benchmarks/run.py [--suite kernels|steps|cost|...|all] [--check [RESULTS]] [--out DIR]
[--tiny] [--cases REGEX]`

This file is the framework only: the registry of suites (SUITES), the CLI, and the results files. Each suite is a
function of the run context returning a JSON-able dict, with an optional table printer, in its own module:
  kernels   the fused ops against their references (kernel_suite.py; one kernel_<op>.py per op)
  data      decode, augment and VAE-encode throughput of the input pipeline (data_suite.py)
  steps     whole training steps of the paper models against reference and torch.compile baselines (steps.py)
  cost      GPU-days of the paper's pipeline from the measured img/s, beside the paper's (cost.py)
  fidelity  USP init against scratch on real images (fidelity.py; only when asked for by name)
Results of a run are merged into <out>/<device-slug>.json (one file per device, one entry per suite, each with
the date, git commit and library versions it was taken with: env.py) and printed as a table.
`--check` compares this device's newest results (or the RESULTS file given) with benchmarks/targets.yaml
(targets.py) and exits 1 with a per-row report when a threshold is missed. With no --suite it only checks; with
none of the two it runs all suites.

Without CUDA the suites run at tiny shapes on CPU, the Triton kernels through the interpreter: a smoke test of
the benchmark code and of kernel correctness, not performance data. No GPU figures are produced there.
"""
import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from usp_fast_benchmarks import cost, data_suite, fidelity, kernel_suite, steps
from usp_fast_benchmarks.charts import write_charts
from usp_fast_benchmarks.env import REPO, environment, slug, use_triton_interpreter_without_cuda
from usp_fast_benchmarks.targets import TARGETS, check, device_targets
from usp_fast.io import atomic_write_text

# name -> (fn(ctx) -> JSON-able dict, fn(result, ctx) printing its table, or None)
SUITES = {
    "kernels": (kernel_suite.kernels_suite, kernel_suite.print_kernels),
    "data": (data_suite.data_suite, data_suite.print_data),
    "steps": (steps.steps_suite, steps.print_steps),
    "cost": (cost.cost_suite, cost.print_cost),
    "fidelity": (fidelity.fidelity_suite, None),
}
ALL_ORDER = ("kernels", "data", "steps", "cost")  # `--suite all` runs these first (cost reuses this run's steps)
NOT_IN_ALL = ("fidelity",)  # an experiment of its own (minutes to hours): only when asked for by name


@dataclass
class Context:
    """What a suite gets: the device and the run's options, and the results so far."""
    device: torch.device
    tiny: bool
    cases: str = None      # regex selecting step cases by name (all when None)
    warmup: int = 5        # untimed steps before timing (GPU; torch.compile compiles there)
    repeats: int = 20      # timed steps (GPU)
    results: dict = field(default_factory=dict)  # this run's suite results so far, by name
    stored: dict = None    # this device's results file as it was before the run
    compile: bool = True   # steps suite: include the torch.compile baselines (GPU)
    preset: str = "cpu"    # fidelity suite: its preset, work folder and results folder
    work: str = None
    out: str = None

    @property
    def on_gpu(self):
        return self.device.type == "cuda"


def write_results(out_dir, env, results):
    """Merge this run's suites into <out_dir>/<device-slug>.json, keeping other suites' earlier results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slug(env['device'])}.json"
    record = json.loads(path.read_text()) if path.exists() else {"suites": {}}
    record.update(env)
    for name, result in results.items():
        old = record["suites"].get(name, {})
        if "rows" in result and "rows" in old:  # a --cases subset updates its rows and keeps the others
            stamp = {"date": env["date"], "commit": env.get("commit")}
            rows = {**old["rows"], **{k: {**v, "measured": stamp} for k, v in result["rows"].items()}}
            result = {**result, "rows": rows}
        record["suites"][name] = {**env, **result}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")  # a kill mid-write leaves the last good file
    write_charts(path)
    return path


def suite_names(arg):
    """'all' -> every suite, ALL_ORDER first; 'steps,cost' -> those, in the order given."""
    if arg == "all":
        return [n for n in ALL_ORDER if n in SUITES] + [n for n in SUITES if n not in ALL_ORDER + NOT_IN_ALL]
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)} or all")
    return names


def run_suites(ctx, names, env, out):
    """Run `names` in order, printing each suite's table and writing its results as soon as it is done."""
    if not ctx.on_gpu and set(names) - set(NOT_IN_ALL):
        print("NO GPU: running on CPU through the Triton interpreter at tiny shapes. GPU figures are absent; "
              "the times below only show that the benchmarks run.")
    for name in names:
        print(f"== suite {name} on {env['device']} ==")
        run, printer = SUITES[name]
        ctx.results[name] = run(ctx)
        if printer:
            printer(ctx.results[name], ctx)
        path = write_results(out, env, {name: ctx.results[name]})  # after each suite: nothing is lost
    print(f"results: {path}")


def check_results(given, own_file, device, targets_path):
    """--check [RESULTS]: the file given, else this device's results file in --out."""
    path = Path(given) if given else own_file
    if not path.exists():
        if not given and not device_targets(device, targets_path):
            print(f"check: no results file {path} and no targets for this device ({slug(device)}): "
                  "nothing was checked")
            return 1
        print(f"check: no results file {path}; run a suite first")
        return 1
    return check(path, targets_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=suite_names, help=f"suites to run, comma-separated, from {', '.join(SUITES)}; "
                        "or all (the default, unless --check is given alone)")
    parser.add_argument("--check", nargs="?", const="", metavar="RESULTS",
                        help="compare results with benchmarks/targets.yaml (default file: this device's in --out)")
    parser.add_argument("--targets", default=str(TARGETS), help="thresholds file for --check")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes even on a GPU (always so on CPU)")
    parser.add_argument("--cases", help="steps suite: only cases whose name matches this regex, e.g. 'XL'")
    parser.add_argument("--repeats", type=int, default=20, help="steps suite: timed steps per case (GPU)")
    parser.add_argument("--no-compile", action="store_true", help="steps suite: skip the torch.compile baselines")
    parser.add_argument("--preset", default="cpu", help="fidelity suite: configs/fidelity/<preset>.yaml (smoke, cpu, "
                        "gpu) or a YAML path")
    parser.add_argument("--work", default=None, help="fidelity suite: folder of its runs (default "
                        "runs/fidelity-<preset>); a rerun continues there")
    args = parser.parse_args(argv)

    use_triton_interpreter_without_cuda()  # before any suite launches a kernel
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ctx = Context(device=device, tiny=args.tiny or device.type != "cuda", cases=args.cases, repeats=args.repeats,
                  compile=not args.no_compile, preset=args.preset, work=args.work, out=args.out)
    env = environment(device)
    own_file = Path(args.out) / f"{slug(env['device'])}.json"
    names = args.suite or (suite_names("all") if args.check is None else [])
    if names:
        ctx.stored = json.loads(own_file.read_text()) if own_file.exists() else None
        run_suites(ctx, names, env, args.out)
    if args.check is not None:
        return check_results(args.check, own_file, env["device"], args.targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
