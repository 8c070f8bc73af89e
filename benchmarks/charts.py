"""Charts beside every benchmark results file: <device>-<suite>.png for each suite the file holds, and
benchmarks/results/README.md showing the newest ones (and the fidelity experiment's pictures).

kernels: forward+backward time per op and implementation, with the speed-ups over eager and torch.compile and the
         fraction of copy bandwidth where a GPU measured them
steps:   img/s per case and implementation, with MFU where measured
cost:    GPU-days per stage: measured here, the paper's H20 figure, and that figure converted to this GPU
data:    images per second of each decoder configuration (decode + augment, + VAE encode)
A CPU results file is labelled as such in every title: its times only show that the benchmarks run.
"""
import json
from pathlib import Path

import numpy as np

from usp_fast.pictures import save_figure


def _figure(ncols=1, width=7.0, height=4.0):
    from usp_fast.pictures import new_figure

    fig, axes = new_figure(1, ncols, figsize=(width * ncols, height))
    return fig, axes[0]


def _bars(ax, groups, series, ylabel, title, log=False):
    """groups: x labels; series: {name: [value or None per group]} -> grouped bars (None: no bar)."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else v for v in values]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def kernels_chart(result, device, path):
    ops = list(result["ops"])
    impls = sorted({i for e in result["ops"].values() for i in e["impls"]})
    speed = any(e.get("speedup") for e in result["ops"].values())
    fig, axes = _figure(3 if speed else 1)
    _bars(axes[0], ops, {i: [result["ops"][op]["impls"].get(i, {}).get("fwd_bwd_ms") for op in ops] for i in impls},
          "fwd+bwd ms", f"kernels on {device}", log=True)
    if speed:
        baselines = sorted({b for e in result["ops"].values() for b in (e.get("speedup") or {})})
        _bars(axes[1], ops, {b: [((result["ops"][op].get("speedup") or {}).get(b) or {}).get("fwd_bwd")
                                 for op in ops] for b in baselines}, "speed-up (x)", "Triton speed-up, fwd+bwd")
        axes[1].axhline(1.0, color="grey", lw=0.8)
        _bars(axes[2], ops, {"triton": [result["ops"][op]["impls"]["triton"].get("copy_bw_fraction_fwd_bwd")
                                        for op in ops]}, "fraction of copy bandwidth", "achieved bandwidth")
    return save_figure(fig, path)


def steps_chart(result, device, path):
    rows = result["rows"]
    cases = sorted({k.rsplit("/", 1)[0] for k in rows})
    impls = sorted({r["impl"] for r in rows.values()})
    mfu = any(r.get("mfu") for r in rows.values())
    fig, axes = _figure(2 if mfu else 1)
    _bars(axes[0], cases, {i: [rows.get(f"{c}/{i}", {}).get("img_per_s") for c in cases] for i in impls}, "img/s",
          f"training steps on {device}", log=True)
    if mfu:
        _bars(axes[1], cases, {i: [rows.get(f"{c}/{i}", {}).get("mfu") for c in cases] for i in impls}, "MFU",
              "model FLOP utilisation")
    return save_figure(fig, path)


def cost_chart(result, device, path):
    rows = result["rows"]
    stages = sorted({k.split("/")[0] for k in rows})
    impl = sorted({k.split("/")[1] for k in rows})[0]
    pick = lambda key: [rows.get(f"{s}/{impl}", {}).get(key) for s in stages]  # noqa: E731
    fig, axes = _figure()
    _bars(axes[0], stages, {f"measured here ({impl})": pick("gpu_days"), "paper, H20 (Table 5)": pick("paper_h20_days"),
                            "paper, converted to this GPU": pick("paper_days_here")}, "GPU-days",
          f"the GPU-day bill on {device}")
    return save_figure(fig, path)


def data_chart(result, device, path):
    keys = [k for k in ("decode_augment_img_s", "decode_augment_encode_img_s") if k in result]
    configs = sorted({c for k in keys for c in result[k]})
    fig, axes = _figure()
    _bars(axes[0], configs, {k.removesuffix("_img_s").replace("_", " + "): [result[k].get(c) for c in configs]
                             for k in keys}, "img/s", f"input pipeline on {device}", log=True)
    return save_figure(fig, path)


CHARTS = {"kernels": kernels_chart, "steps": steps_chart, "cost": cost_chart, "data": data_chart}


def write_charts(results_path):
    """A chart per suite of one results file, beside it -> [paths]; then the results README is refreshed."""
    results_path = Path(results_path)
    record = json.loads(results_path.read_text())
    device = record["device"] + (" (CPU: NOT performance data)" if record["device"].startswith("cpu") else "")
    made = []
    for name, result in record.get("suites", {}).items():
        chart = CHARTS.get(name)
        if chart is None:
            continue
        try:
            made.append(chart(result, device, results_path.with_name(f"{results_path.stem}-{name}.png")))
        except (KeyError, TypeError, ValueError) as e:  # an older file's layout: say so, keep the others
            print(f"charts: {results_path.name} suite {name}: not charted ({type(e).__name__}: {e})")
    write_index(results_path.parent)
    return made


def write_index(folder):
    """benchmarks/results/README.md: every results file with its date and charts, newest first."""
    from usp_fast.io import atomic_write_text

    folder = Path(folder)
    lines = ["# Benchmark results", "", "Written by `benchmarks/run.py` (charts: `benchmarks/charts.py`); do not edit "
             "by hand. CPU files come from the Triton interpreter at tiny shapes: they show that the benchmarks "
             "run, not performance.", ""]
    entries = []
    for path in folder.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        entries.append((doc.get("date") or "", path, doc))
    for date, path, doc in sorted(entries, key=lambda e: e[0], reverse=True):
        lines += [f"## {path.name}", "", f"{doc.get('device')}, {date[:10]}, commit {str(doc.get('commit'))[:10]}", ""]
        for png in sorted(folder.glob(f"{path.stem}-*.png")):
            lines.append(f"![{png.stem}]({png.name})")
        table = folder / f"{path.stem}-table.md"
        if table.is_file():
            lines += ["", table.read_text().strip()]
        lines.append("")
    atomic_write_text(folder / "README.md", "\n".join(lines) + "\n")
    return folder / "README.md"
