"""The `cost` suite: GPU-days of the paper's pipeline (ViT-XL pretrain + DiT-XL/2 fine-tune) from the img/s the
steps suite measured, beside the paper's figures converted to this GPU by the ratio of peak bf16 FLOP/s.

Every assumption is in ASSUMPTIONS and printed with the table. The steps figures come from the same run when it
ran the steps suite, else from this device's stored results, else the two cases are measured here (GPU only).
Without a GPU nothing is estimated: the tiny CPU models say nothing about GPU-days.
"""
from usp_fast_benchmarks import steps
from usp_fast_benchmarks.env import DATASHEET_BF16_TFLOPS

# USP paper, Table 5: 98 H20 GPU-days to FID 9.6 = 36 (pretrain) + 62 (DiT-XL/2 fine-tune, 700K steps).
PAPER = {"gpu": "NVIDIA H20", "peak_bf16_tflops": DATASHEET_BF16_TFLOPS["NVIDIA H20"], "fid": 9.6,
         "gpu_days": {"pretrain": 36.0, "finetune": 62.0, "total": 98.0}}
PRETRAIN = {"case": "pretrain/usp_vit_xl/b128", "epochs": 800, "dataset_images": 1.28e6}
FINETUNE = {"case": "generate/DiT-XL/2/b32", "steps": 700_000, "global_batch": 256}
STAGES = {"pretrain": PRETRAIN["epochs"] * PRETRAIN["dataset_images"],
          "finetune": FINETUNE["steps"] * FINETUNE["global_batch"]}  # images processed

ASSUMPTIONS = [
    f"pretrain: USP ViT-XL, {PRETRAIN['epochs']} epochs x {PRETRAIN['dataset_images']:.3g} images = "
    f"{STAGES['pretrain']:.4g} images at 224 px (28x28 latents, 196 patches, 49 visible), per-GPU batch 128 "
    "(configs/pretrain/vit_xl.yaml), img/s of the steps case " + PRETRAIN["case"],
    f"fine-tune: DiT-XL/2, {FINETUNE['steps']:,} steps x batch {FINETUNE['global_batch']} = {STAGES['finetune']:.4g} "
    "images at 256 px (32x32 latents, 256 tokens), per-GPU batch 32 (8 GPUs x 32, configs/generate/dit_xl2.yaml), "
    "img/s of the steps case " + FINETUNE["case"],
    "GPU-days = images / (img/s of one GPU) / 86400: perfect scaling over GPUs; no communication, data loading, "
    "checkpointing, evaluation or sampling time; the latent cache is built beforehand and not counted",
    f"paper (Table 5): {PAPER['gpu_days']['total']:g} {PAPER['gpu']} GPU-days to FID {PAPER['fid']} = "
    f"{PAPER['gpu_days']['pretrain']:g} pretrain + {PAPER['gpu_days']['finetune']:g} fine-tune",
    f"paper converted to this GPU: days x {PAPER['peak_bf16_tflops']:g} TFLOP/s (H20 dense bf16, datasheet) / this "
    "GPU's peak bf16 TFLOP/s, measured by a large matmul in the same run as the img/s (and, beside it, its "
    "datasheet figure): assumes the paper's code reached the same MFU on H20 as it would here",
]


def gpu_days(images, img_per_s):
    return images / img_per_s / 86400


def estimate(steps_result, impls):
    """Rows '<stage>/<impl>' for stage in pretrain, finetune, total: measured GPU-days and the paper's converted
    ones. `steps_result` is a steps suite result from a GPU, or None (every measured figure None)."""
    peak = (steps_result or {}).get("peak") or {}
    measured_rows = (steps_result or {}).get("rows", {})
    rows = {}
    for impl in impls:
        total, complete = 0.0, True
        for stage, spec in (("pretrain", PRETRAIN), ("finetune", FINETUNE)):
            img_per_s = measured_rows.get(f"{spec['case']}/{impl}", {}).get("img_per_s")
            days = gpu_days(STAGES[stage], img_per_s) if img_per_s else None
            rows[f"{stage}/{impl}"] = {"img_per_s": img_per_s, "gpu_days": days,
                                       **paper_figures(PAPER["gpu_days"][stage], peak, days)}
            complete = complete and days is not None
            total += days or 0.0
        days = total if complete else None
        rows[f"total/{impl}"] = {"img_per_s": None, "gpu_days": days,
                                 **paper_figures(PAPER["gpu_days"]["total"], peak, days)}
    return rows


def paper_figures(paper_days, peak, days):
    """The paper's H20 GPU-days and their conversion to this GPU by measured / datasheet peak."""
    def convert(tflops):
        return paper_days * PAPER["peak_bf16_tflops"] / tflops if tflops else None

    here = convert(peak.get("measured_tflops"))
    return {"paper_h20_days": paper_days, "paper_days_here": here,
            "paper_days_here_datasheet": convert(peak.get("datasheet_tflops")),
            "vs_paper": days / here if days is not None and here else None}


def _steps_result(ctx):
    """(steps result, where it came from) holding the cost cases of every implementation on this GPU."""
    wanted = [f"{spec['case']}/{impl.name}" for spec in (PRETRAIN, FINETUNE) for impl in steps.IMPLS]
    stored = (ctx.stored or {}).get("suites", {}).get("steps")  # the file is this device's
    candidates = [(ctx.results.get("steps"), "the steps suite of this run")]
    if stored:
        candidates.append((stored, f"stored steps results of {stored['date']} (commit {stored['commit']})"))
    for result, source in candidates:
        if result and all(k in result["rows"] for k in wanted):
            return result, source
    cases = [c for c in steps.paper_cases() if c.name in (PRETRAIN["case"], FINETUNE["case"])]
    return steps.run_cases(ctx, cases), "measured by this suite"


def cost_suite(ctx):
    impls = [impl.name for impl in steps.IMPLS]
    if not ctx.on_gpu or ctx.tiny:
        return {"assumptions": ASSUMPTIONS, "paper": PAPER, "peak": None, "source": None, "rows": estimate(None, impls),
                "note": "no GPU (or --tiny): GPU figures are absent; only the paper's H20 figures are shown"}
    result, source = _steps_result(ctx)
    return {"assumptions": ASSUMPTIONS, "paper": PAPER, "peak": result["peak"], "source": source,
            "rows": estimate(result, impls), "note": None}


def print_cost(result, ctx):
    fmt = steps.fmt
    print("assumptions:")
    for line in ASSUMPTIONS:
        print(f"  - {line}")
    if result["note"]:
        print(f"  ({result['note']})")
    else:
        peak = result["peak"]
        print(f"  peak here: {peak['measured_tflops']:.1f} TFLOP/s measured, datasheet "
              f"{fmt(peak['datasheet_tflops'])}; img/s from {result['source']}")
    header = (f"{'stage':<10}{'impl':<19}{'img/s':>9}{'GPU-days':>10}{'paper H20':>11}{'paper here':>12}"
              f"{'(datasheet)':>12}{'x paper':>9}")
    steps.print_header(header)
    for key, row in result["rows"].items():
        stage, impl = key.split("/", 1)
        print(f"{stage:<10}{impl:<19}{fmt(row['img_per_s']):>9}{fmt(row['gpu_days']):>10}"
              f"{row['paper_h20_days']:>11.1f}{fmt(row['paper_days_here']):>12}"
              f"{fmt(row['paper_days_here_datasheet']):>12}{fmt(row['vs_paper'], '.2f'):>9}")
