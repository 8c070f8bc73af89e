"""The thresholds of benchmarks/targets.yaml (read here and nowhere else) and `--check`, which judges a results
file by them: every kernel's error against eager (any device), the kernels suite's own speed targets where it ran
on a GPU, and the device's targets over the other suites' rows. Beside each step speed-up over the reference it
prints the bound the bytes model allows with the measured reference step (benchmarks/roofline.py): a speed-up
above it means the reference lost time the model does not count (its attention backend, launch gaps)."""
import fnmatch
import json
from pathlib import Path

import yaml

from usp_fast_benchmarks.env import slug

TARGETS = Path(__file__).resolve().parent / "targets.yaml"


def read_targets(path=TARGETS):
    return yaml.safe_load(Path(path).read_text()) or {}


def device_targets(device, targets_path=TARGETS):
    """The thresholds of the device named `device` (a name or slug), {} when it has none."""
    return read_targets(targets_path).get(slug(device)) or {}


def kernel_bounds(targets_path=TARGETS):
    """The `_kernels` section: {'speed': {op: {target: wanted}}, 'max_rel_error_vs_eager': {dtype: bound}}; from
    the committed file when `targets_path` has none (a thresholds file for other devices need not repeat it)."""
    return read_targets(targets_path).get("_kernels") or read_targets(TARGETS)["_kernels"]


def kernel_speed_targets(op):
    """The kernels suite's speed targets of `op`, {target: wanted}, e.g. {'vs_eager': 2.0}."""
    return kernel_bounds()["speed"][op]


def _kernel_checks(record, bounds):
    """Every op's error against eager (any device), and the kernels suite's own speed targets as the run recorded
    them, judged where it ran on a GPU."""
    tolerances = bounds["max_rel_error_vs_eager"]
    for op, entry in record["suites"].get("kernels", {}).get("ops", {}).items():
        tol = tolerances.get(entry.get("dtype"), tolerances["float32"])
        err = entry.get("max_rel_error_vs_eager")
        yield f"kernels/{op}", "max_rel_error_vs_eager", err, f"<= {tol:g}", err is not None and err <= tol
        for target, met in (entry.get("targets_met") or {}).items():
            yield f"kernels/{op}", target, met["got"], f">= {met['wanted']}", met["met"]


def _step_bound(record, key, metric):
    """' (bytes bound x.xx)' for a steps speed-up over the reference of a known case on a GPU with datasheet
    figures, from the reference row's measured step time; '' otherwise."""
    from usp_fast_benchmarks import roofline, steps

    case_name, _ = key.rsplit("/", 1)
    ref = record["suites"]["steps"]["rows"].get(f"{case_name}/{metric.removeprefix('speedup_vs_')}", {})
    case = next((c for c in steps.paper_cases() if c.name == case_name), None)
    if case is None or not ref.get("step_ms") or record["device"] not in roofline.DATASHEET_HBM_TBPS:
        return ""
    bound = roofline.step_bound(case.stage, case.config(), case.batch, record["device"], ref["step_ms"])
    return f"; bytes bound {bound['max_speedup_vs_reference']:.3g}"


def _target_checks(record, targets):
    """targets: {suite: [{row: glob, metric: name, min: x and/or max: y}]} against each suite's `rows`; a suite
    whose results lack rows a full run has (a --cases subset) is missed as well."""
    for suite_name, items in targets.items():
        result = record["suites"].get(suite_name, {})
        rows = result.get("rows", {})
        absent = sorted(set(result.get("expected_rows", [])) - set(rows))
        if absent:
            yield (f"{suite_name}/(partial run: {len(absent)} rows absent, e.g. {absent[0]})", "rows", None,
                   "a full run", False)
        for t in items:
            bounds = " and ".join(f"{op} {t[k]}" for k, op in (("min", ">="), ("max", "<=")) if k in t)
            matched = fnmatch.filter(rows, t["row"])
            if not matched:
                yield f"{suite_name}/{t['row']}", t["metric"], None, bounds, False
            for key in matched:
                got = rows[key].get(t["metric"])
                ok = got is not None and got >= t.get("min", -float("inf")) and got <= t.get("max", float("inf"))
                note = _step_bound(record, key, t["metric"]) \
                    if suite_name == "steps" and t["metric"].startswith("speedup_vs_reference") else ""
                yield f"{suite_name}/{key}", t["metric"], got, bounds + note, ok


def check(results_path, targets_path=TARGETS):
    """Print one line per target and return 1 if any is missed (absent results count as missed), else 0."""
    record = json.loads(Path(results_path).read_text())
    device = slug(record["device"])
    targets = device_targets(device, targets_path)
    rows = [*_kernel_checks(record, kernel_bounds(targets_path)), *_target_checks(record, targets)]
    if not targets:
        print(f"check {results_path}: no targets for this device ({device}) in {targets_path}: its speed is not "
              "judged" + ("; only kernel correctness is" if rows else "; nothing was checked"))
        if not rows:
            return 1
    print(f"check {results_path} ({record['device']}, {record.get('date')}, commit {record.get('commit')}) "
          f"against {targets_path}:")
    for row, metric, got, wanted, ok in rows:
        shown = "absent" if got is None else format(got, ".4g")
        print(f"  {'ok    ' if ok else 'MISSED'} {row:<48} {metric:<28} {shown:>10}  (wanted {wanted})")
    missed = sum(not r[-1] for r in rows)
    print(f"{len(rows) - missed} of {len(rows)} targets met" + (f"; {missed} MISSED" if missed else ""))
    return 1 if missed else 0
