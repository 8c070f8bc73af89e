"""The steps and cost suites and `--check`: analytic FLOPs against torch's FLOP counter and the DiT paper, the CPU
smoke run of the CLI, the GPU-days arithmetic, and --check's verdicts on synthetic results."""
import fnmatch
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[2]

from usp_fast_benchmarks import cost, flops, steps  # noqa: E402
from usp_fast.models import dit, usp_vit  # noqa: E402


@pytest.fixture(scope="module")
def bench_run():
    """benchmarks/run.py as a module (not as `benchmarks.run`: its CLI is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- analytic FLOPs ----

def _count(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


SMALL = [
    ("pretrain", usp_vit.model_config("usp_vit_test", input_size=8, embed_dim=64, num_heads=4, mlp_ratio=3.0)),
    ("generate", dit.model_config("DiT-Test/2", input_size=8, num_classes=10)),  # learn_sigma: 2C outputs
    ("generate", dit.model_config("SiT-Test/4", input_size=8, num_classes=10, hidden_size=48, num_heads=3)),
]


@pytest.mark.parametrize("stage,cfg", SMALL, ids=["usp_vit", "DiT", "SiT"])
def test_analytic_flops_equal_flop_counter(stage, cfg, monkeypatch):
    """Forward: exactly the counted matmul FLOPs. Forward + backward: exactly 3 x forward less the input-gradient
    products of the layers whose input needs no gradient (what the 3x convention over-counts)."""
    monkeypatch.setenv("USP_FAST_KERNELS", "reference")
    torch.manual_seed(0)
    B = 3
    x = torch.randn(B, 4, 8, 8)
    if stage == "pretrain":
        model, want = usp_vit.USPViT(cfg), flops.usp_vit(cfg)

        def loss():
            return model(x)[0]
    else:
        from usp_fast.diffusion import create_objective, default_objective

        model, want = dit.DiT(cfg), flops.dit(cfg)
        objective = create_objective(default_objective(cfg.family), cfg.learn_sigma)
        y = torch.randint(0, 10, (B,))

        def loss():
            return objective.training_loss(model, x, y, None)[0]
    with sdpa_kernel(SDPBackend.MATH):  # the counter sees attention as bmm (CPU's fused SDPA is not counted)
        value, forward = _count(loss)
        _, backward = _count(value.backward)
    assert forward == B * want.forward
    assert forward + backward == B * (want.train - want.no_input_grad)


def test_dit_flops_match_the_dit_paper():
    """DiT's Table 4 Gflops are multiply-adds: half of our 2*m*n*k count."""
    published = {"DiT-XL/2": 118.6, "DiT-L/2": 80.7, "DiT-B/2": 23.0, "DiT-S/2": 6.06, "DiT-XL/4": 29.1}
    for name, gmacs in published.items():
        got = flops.dit(dit.model_config(name)).forward / 2e9
        assert got == pytest.approx(gmacs, rel=3e-3), name


def test_three_x_convention_overcounts_little_at_paper_sizes():
    for f in [flops.usp_vit(usp_vit.model_config(n)) for n in steps.PRETRAIN_MODELS] + \
             [flops.dit(dit.model_config(n)) for n in steps.GENERATE_MODELS]:
        assert 0 < f.no_input_grad < 3e-4 * f.forward


def test_pretrain_flops_follow_the_masking():
    """The encoder sees cls + 49 of 196 tokens at 224 px: fewer visible tokens, fewer FLOPs."""
    cfg = usp_vit.model_config("usp_vit_xl")
    assert cfg.num_patches == 196 and int(196 * (1 - cfg.mask_ratio)) == 49
    assert flops.usp_vit(usp_vit.model_config("usp_vit_xl", mask_ratio=0.5)).forward > flops.usp_vit(cfg).forward


# ---- the CLI on CPU ----

def test_steps_and_cost_suites_on_cpu_then_check(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--suite", "steps,cost", "--check",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # nothing judged is not a pass
    assert "GPU figures are absent" in proc.stdout
    assert "no targets for this device" in proc.stdout and "nothing was checked" in proc.stdout

    record = json.loads(next(tmp_path.glob("cpu*.json")).read_text())
    result = record["suites"]["steps"]
    cases = {c.name: c for c in steps.tiny_cases()}
    engine = {f"{name}/engine" for name in cases} | {f"{name}/ema-before" for name in cases if "generate" in name}
    assert set(result["rows"]) == {f"{name}/{impl}" for name in cases for impl in ("usp-fast", "reference")} | engine
    assert set(result["expected_rows"]) == set(result["rows"])
    for key in sorted(engine):  # on CPU through the references (no interpreter); an EMA share where there is an EMA
        row = result["rows"].pop(key)
        assert row["kernels"] == "reference" and row["step_ms"] > 0 and row["world"] == 1, key
        assert (row["ema_share"] is None) == key.startswith("pretrain"), key
        if row["ema_share"] is not None:
            assert 0 <= row["ema_share"] <= 1, key
    for key, row in result["rows"].items():
        case = cases[key.rsplit("/", 1)[0]]
        # the dispatch switch took effect: the fast model ran the Triton kernels (interpreted), the baseline not
        assert row["kernels"] == ("triton" if row["impl"] == "usp-fast" else "reference"), key
        assert row["attention"] == "sdpa" and row["compiled"] is False
        assert row["step_ms"] > 0 and math.isfinite(row["final_loss"])
        assert row["train_gflop_per_img"] == pytest.approx(case.flops().train / 1e9)
        assert row["mfu"] is None and row["peak_gib"] is None  # no GPU: no MFU, no CUDA memory
        assert not any(k.startswith("speedup") for k in row)

    costs = record["suites"]["cost"]
    assert costs["assumptions"] and "GPU figures are absent" in costs["note"]
    for impl in ("usp-fast", "reference", "reference+compile"):
        assert costs["rows"][f"total/{impl}"]["paper_h20_days"] == 98
        assert all(row["gpu_days"] is None and row["paper_days_here"] is None for row in costs["rows"].values())
    assert costs["commit"] == record["commit"] and costs["device"] == record["device"]


# ---- the engine step ----

def test_the_engine_step_is_the_trainers_step_on_the_bare_rows_model(monkeypatch):
    """EngineStep runs Trainer._step itself on the model the bare rows measure: its first loss is the stage's loss
    of that model at the engine's first generator seed; DeepSpeed steps the optimizer once per `accum`
    micro-batches; the EMA follows the fp32 masters only while it is on."""
    from usp_fast.engine import Trainer
    from usp_fast.seeding import step_seed
    from usp_fast.stages import stage_class

    monkeypatch.setenv("USP_FAST_KERNELS", "reference")
    case = steps.tiny_cases()[1]  # DiT-Test/2
    step = steps.EngineStep(case, accum=2)
    try:
        assert step._step.__func__ is Trainer._step and step.engine.module.cfg == case.config()
        task = stage_class(case.stage)(step.cfg)
        torch.manual_seed(step.cfg.run.seed)
        model = task.build_model(step.manifest, step.latent_norm)  # as initialised for the engine
        gen = torch.Generator().manual_seed(step_seed(step.cfg.run.seed, 0, 0, 0))
        want = task.loss(model, step._latents(step.raw, gen), gen)[0]
        gen = torch.Generator().manual_seed(step_seed(step.cfg.run.seed, 0, 1, 0))
        want = (want + task.loss(model, step._latents(step.raw, gen), gen)[0]) / 2
        assert step.step().item() == pytest.approx(want.item(), rel=1e-6)
        assert (step.engine.global_steps, step.engine.micro_steps) == (1, 2)
        shadow = [t.clone() for t in step.task.ema.shadow]
        step.ema_on = False
        step.step()
        assert all(torch.equal(a, b) for a, b in zip(shadow, step.task.ema.shadow)) and len(step.ema_times) == 1
        step.ema_on = True
        step.step()
        assert not all(torch.equal(a, b) for a, b in zip(shadow, step.task.ema.shadow)) and len(step.ema_times) == 2
    finally:
        step.close()


def test_engine_rows_report_the_ema_share_and_the_old_gather(monkeypatch):
    """One rank, a few steps: the engine row with its EMA share, and the per-parameter gather as the "before"."""
    from types import SimpleNamespace

    ctx = SimpleNamespace(on_gpu=False, device=torch.device("cpu"), warmup=1, repeats=2)
    case = steps.tiny_cases()[2]  # SiT-Test/2
    rows = steps.measure_engine(ctx, case, {"datasheet_tflops": None}, impl=steps.IMPLS[1])
    now, before = rows[f"{case.name}/engine"], rows[f"{case.name}/ema-before"]
    assert now["kernels"] == "reference" and now["zero_stage"] == 1 and math.isfinite(now["final_loss"])
    assert 0 < now["ema_ms"] < now["step_ms"] and 0 < now["ema_share"] < 1
    assert before["ema_ms"] > 0 and 0 < before["ema_share"] < 1
    assert before["step_ms"] == pytest.approx(now["step_ms_without_ema"] + before["ema_ms"])


def test_suite_all_runs_kernels_data_steps_cost(bench_run):
    assert bench_run.suite_names("all")[:4] == ["kernels", "data", "steps", "cost"]
    assert bench_run.suite_names("cost,steps") == ["cost", "steps"]


# ---- cost arithmetic ----

def test_cost_estimate_from_measured_throughput():
    steps_result = {"peak": {"measured_tflops": 740.0, "datasheet_tflops": 989.4},
                    "rows": {"pretrain/usp_vit_xl/b128/usp-fast": {"img_per_s": 1000.0},
                             "generate/DiT-XL/2/b32/usp-fast": {"img_per_s": 500.0},
                             "pretrain/usp_vit_xl/b128/reference": {"img_per_s": 800.0}}}
    rows = cost.estimate(steps_result, ["usp-fast", "reference"])
    pretrain = 800 * 1.28e6 / 1000.0 / 86400
    finetune = 700_000 * 256 / 500.0 / 86400
    assert rows["pretrain/usp-fast"]["gpu_days"] == pytest.approx(pretrain)
    assert rows["finetune/usp-fast"]["gpu_days"] == pytest.approx(finetune)
    total = rows["total/usp-fast"]
    assert total["gpu_days"] == pytest.approx(pretrain + finetune)
    assert total["paper_days_here"] == pytest.approx(98 * 148 / 740)
    assert total["paper_days_here_datasheet"] == pytest.approx(98 * 148 / 989.4)
    assert total["vs_paper"] == pytest.approx((pretrain + finetune) / (98 * 148 / 740))
    # a stage not measured leaves the total unknown rather than understated
    assert rows["pretrain/reference"]["gpu_days"] == pytest.approx(800 * 1.28e6 / 800.0 / 86400)
    assert rows["finetune/reference"]["gpu_days"] is None and rows["total/reference"]["gpu_days"] is None


# ---- --check ----

TARGETS = {"test-gpu": {
    "steps": [{"row": "pretrain/*/b128/usp-fast", "metric": "speedup_vs_reference", "min": 1.0},
              {"row": "pretrain/*/b128/usp-fast", "metric": "peak_gib", "max": 60}],
    "cost": [{"row": "total/usp-fast", "metric": "vs_paper", "max": 1.0}],
}}


def _record(speedup=1.5, vs_paper=0.8, kernels_met=True, kernel_error=1e-3, partial=False):
    rows = {f"pretrain/{m}/b128/usp-fast": {"speedup_vs_reference": s, "peak_gib": 30.0}
            for m, s in (("usp_vit_b", speedup), ("usp_vit_xl", 1.5))}
    expected = sorted(rows) + (["pretrain/usp_vit_l/b128/usp-fast"] if partial else [])
    kernel = {"dtype": "bfloat16", "max_rel_error_vs_eager": kernel_error,
              "targets_met": {"vs_eager": {"wanted": 2.0, "got": 2.5 if kernels_met else 1.5, "met": kernels_met}}}
    return {"device": "Test GPU", "date": "2026-01-01T00:00:00+00:00", "commit": "0" * 40,
            "suites": {"steps": {"rows": rows, "expected_rows": expected},
                       "cost": {"rows": {"total/usp-fast": {"vs_paper": vs_paper}}},
                       "kernels": {"ops": {"ln_modulate": kernel}}}}


@pytest.mark.parametrize("change,missed_row", [
    ({}, None),
    ({"speedup": 0.9}, "steps/pretrain/usp_vit_b/b128/usp-fast"),
    ({"vs_paper": 1.2}, "cost/total/usp-fast"),
    ({"vs_paper": None}, "cost/total/usp-fast"),  # an absent figure is not a met target
    ({"kernels_met": False}, "kernels/ln_modulate"),
    ({"kernel_error": 0.5}, "kernels/ln_modulate"),  # fast but wrong
    ({"partial": True}, "steps/(partial run: 1 rows absent"),  # a --cases subset
])
def test_check_exits_nonzero_with_the_missed_row(bench_run, tmp_path, capsys, change, missed_row):
    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump(TARGETS))
    results = tmp_path / "test-gpu.json"
    results.write_text(json.dumps(_record(**change)))
    code = bench_run.check(results, targets)
    out = capsys.readouterr().out
    missed = [line for line in out.splitlines() if "MISSED" in line and "targets met" not in line]
    if missed_row is None:
        assert code == 0 and not missed and "7 of 7 targets met" in out
    else:
        assert code == 1 and len(missed) == 1 and missed_row in missed[0], out


def test_check_prints_the_bytes_bound_beside_a_step_speedup(bench_run, tmp_path, capsys):
    """With the reference's measured step time t, DiT-XL/2 b256 on an H200 may gain at most t / (t - 35.6 ms)."""
    from usp_fast.models import dit
    from usp_fast_benchmarks import roofline

    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump({"nvidia-h200": {"steps": [
        {"row": "generate/DiT-XL/2/b256/usp-fast", "metric": "speedup_vs_reference", "min": 1.05}]}}))
    rows = {"generate/DiT-XL/2/b256/usp-fast": {"speedup_vs_reference": 1.06},
            "generate/DiT-XL/2/b256/reference": {"step_ms": 445.0}}
    results = tmp_path / "nvidia-h200.json"
    results.write_text(json.dumps({"device": "NVIDIA H200", "suites": {"steps": {"rows": rows}}}))
    assert bench_run.check(results, targets) == 0
    saved = roofline.step_bound("generate", dit.model_config("DiT-XL/2"), 256, "NVIDIA H200")["saved_ms"]
    assert f"bytes bound {445 / (445 - saved):.3g}" in capsys.readouterr().out


def test_check_without_targets_for_the_device_fails_saying_so(bench_run, tmp_path, capsys):
    record = {**_record(speedup=0.1), "device": "Other GPU"}
    record["suites"].pop("kernels")  # its own targets would apply on any GPU
    results = tmp_path / "other.json"
    results.write_text(json.dumps(record))
    assert bench_run.check(results, bench_run.TARGETS) == 1  # nothing judged is not a pass
    assert "no targets for this device (other-gpu)" in capsys.readouterr().out


def test_committed_targets_name_real_rows_and_metrics():
    """Every target in benchmarks/targets.yaml names a suite, a row pattern and a metric the suites produce."""
    targets = yaml.safe_load((REPO / "benchmarks" / "targets.yaml").read_text())
    devices = {k: v for k, v in targets.items() if not k.startswith("_")}
    assert "nvidia-h100-80gb-hbm3" in devices
    step_metrics = {"mfu", "img_per_s", "step_ms", "peak_gib"} | {f"speedup_vs_{i.name}" for i in steps.IMPLS[1:]}
    step_rows = [f"{c.name}/{i.name}" for c in steps.paper_cases() for i in steps.IMPLS]
    cost_rows = cost.estimate(None, [i.name for i in steps.IMPLS])
    for device, suites in devices.items():
        for suite, items in suites.items():
            rows, metrics = {"steps": (step_rows, step_metrics),
                             "cost": (list(cost_rows), set(next(iter(cost_rows.values()))))}[suite]
            for t in items:
                assert fnmatch.filter(rows, t["row"]), (device, t)
                assert t["metric"] in metrics, (device, t)
                assert {"min", "max"} & set(t), (device, t)


def test_tables_print_gpu_shaped_results(capsys):
    """The GPU branch of the printers (speed-ups, MFU, memory, out-of-memory rows, GPU-days), on synthetic rows:
    no GPU measures them here."""
    class GPU:
        on_gpu = True

    base = {"stage": "pretrain", "model": "usp_vit_xl", "batch": 128, "kernels": "triton", "attention": "sdpa",
            "step_ms": 100.0, "img_per_s": 1280.0, "mfu": 0.41, "peak_gib": 30.5}
    rows = {"pretrain/usp_vit_xl/b128/usp-fast": {**base, "impl": "usp-fast", "speedup_vs_reference": 1.7},
            "pretrain/usp_vit_xl/b128/reference": {**base, "impl": "reference", "kernels": "reference"},
            "pretrain/usp_vit_xl/b128/reference+compile": {"impl": "reference+compile", "oom": True}}
    peak = {"measured_tflops": 740.0, "how": "matmul", "datasheet_tflops": 989.4}
    steps.print_steps({"peak": peak, "timing": "events", "rows": rows}, GPU)
    out = capsys.readouterr().out
    assert "41.0%" in out and "1.70" in out and "out of memory" in out

    result = {"note": None, "peak": peak, "source": "this run",
              "rows": cost.estimate({"peak": peak, "rows": rows}, ["usp-fast"])}
    cost.print_cost(result, GPU)
    out = capsys.readouterr().out
    assert f"{800 * 1.28e6 / 1280 / 86400:.1f}" in out and f"{36 * 148 / 740:.1f}" in out


def test_a_cases_subset_updates_its_rows_and_keeps_the_others(bench_run, tmp_path):
    env = {"device": "Test GPU", "date": "2026-01-01T00:00:00+00:00", "commit": "a" * 40}
    first = {"rows": {"pretrain/usp_vit_b/b128/usp-fast": {"step_ms": 10.0},
                      "pretrain/usp_vit_xl/b128/usp-fast": {"step_ms": 50.0}}}
    bench_run.write_results(tmp_path, env, {"steps": first})
    later = {**env, "date": "2026-01-02T00:00:00+00:00", "commit": "b" * 40}
    path = bench_run.write_results(tmp_path, later, {"steps": {"rows": {"pretrain/usp_vit_xl/b128/usp-fast":
                                                                        {"step_ms": 40.0}}}})
    rows = json.loads(path.read_text())["suites"]["steps"]["rows"]
    assert rows["pretrain/usp_vit_b/b128/usp-fast"]["step_ms"] == 10.0  # kept, with the run that measured it
    assert rows["pretrain/usp_vit_xl/b128/usp-fast"]["step_ms"] == 40.0
    assert rows["pretrain/usp_vit_xl/b128/usp-fast"]["measured"]["commit"] == "b" * 40
