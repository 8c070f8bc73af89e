"""The fidelity experiment (benchmarks/fidelity.py): the smoke preset end to end on the real shared data (skipped
without ../shared), its resumption, the clean skip without the data, and the summary arithmetic."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usp_fast.errors import ConfigError
from usp_fast_benchmarks import fidelity
from usp_fast.metrics.generation import frechet_from_features
from usp_fast_benchmarks.fidelity import estimate, load_preset, run_fidelity, steps_to_reach, summarize
from usp_fast_benchmarks.fidelity_eval import FastFID, fid_infinity

SHARED = Path(fidelity.REPO).parent / "shared"
NEEDED = [SHARED / "data" / "imagenet-samples" / "train", SHARED / "data" / "clothing-256", SHARED / "weights" / "taef2"]


def _skip_without_shared():
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        pytest.skip(f"../shared is absent ({', '.join(missing)}): the fidelity smoke run needs its real images and "
                    "TAEF2 weights")


def _picture(path):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.std() > 5, f"{path} is blank"
    return img


def test_smoke_preset_end_to_end_and_resumes(tmp_path, capsys):
    _skip_without_shared()
    work, out = tmp_path / "work", tmp_path / "out"
    result = run_fidelity("smoke", work=work, out=out)
    assert "fidelity: estimated" in capsys.readouterr().out  # the estimate from the preset's measured costs
    doc = json.loads(Path(result["results"]).read_text())
    preset, _ = load_preset("smoke")
    steps = doc["eval_steps"]
    assert steps == [2, 4] and doc["preset"] == "smoke" and doc["commit"] is not None
    assert set(doc["phase_s"]) >= {"caches", "pretrain", "reference", "train_arms", "evaluate", "probe"}

    expected = {f"dit_{a}" for a in preset.generate.dit_arms} | {f"sit_{a}" for a in preset.generate.sit_arms} | {
        f"clothing_dit_{a}" for a in preset.generate.clothing_arms} | {f"dit_{a}" for a in preset.dose_arms()}
    assert "dit_usp_random" in expected and "dit_usp_pt3" in expected
    assert set(doc["arms"]) == expected
    assert doc["seeds"] == preset.seeds == [0, 1]
    for name, arm in doc["arms"].items():
        assert arm["steps"] == steps, name
        assert all(np.isfinite(arm["fid"])) and all(f > 0 for f in arm["fid"]), name
        assert all(lo <= hi for lo, hi in zip(arm["fid_lo"], arm["fid_hi"])), name
        assert arm["loss_curve"][-1][0] == steps[-1], name
        assert arm["conditional"] == name.startswith("clothing"), name
        seeds = preset.seeds[:preset.generate.dose_seeds] if "_pt" in name else preset.seeds
        assert arm["seeds"] == seeds and list(arm["per_seed"]) == [str(k) for k in seeds], name
        for seed, run in arm["per_seed"].items():  # per-seed curves: FID, KID (std over subsets), FID_inf, features
            assert run["run"] == f"{name}_seed{seed}" and len(run["fid"]) == len(steps), name
            assert all(np.isfinite(run["kid"])) and all(s >= 0 for s in run["kid_std"]), name
            assert all(np.isfinite(run["fid_inf"])), name
            for step, rel in zip(steps, run["features"]):
                assert rel == f"features/{name}_seed{seed}_step{step}.npz"
                assert np.load(work / rel)["features"].shape == (preset.eval.num_samples, 2048)
        assert arm["fid"] == pytest.approx(np.mean([r["fid"] for r in arm["per_seed"].values()], axis=0)), name
        assert len(arm["kid"]) == len(steps) and len(arm["fid_std"]) == len(steps), name
    assert doc["features_dir"] == str((work / "features").resolve())
    for dataset in ("imagenet", "clothing"):
        assert np.isfinite(doc["reference"][dataset]["floors"]["recon"]["kid"])
    assert doc["arms"]["dit_scratch"]["transfer_notes"] is None
    assert doc["arms"]["dit_usp_random"]["transfer_notes"] is not None  # a usp transfer, from the untrained encoder
    no_ln = " ".join(doc["arms"]["dit_usp_no_ln"]["transfer_notes"])
    assert "LayerNorm" in no_ln and " ".join(doc["arms"]["dit_usp"]["transfer_notes"]) != no_ln
    for dataset in ("imagenet", "clothing"):
        floors = doc["reference"][dataset]["floors"]
        assert floors["recon"]["fid"] > 0 and floors["real_subset"]["fid"] > 0
    assert doc["reference"]["imagenet"]["real_images"] == preset.num_images
    assert doc["pretrain"]["normpix"]["curve"][-1][0] == preset.pretrain.steps
    assert "raw" not in doc["pretrain"]  # pretrained only for a usp_no_normpix arm, which smoke does not have
    assert set(doc["probe"]) == {"usp", "random_init"}
    assert all(0 <= v["top1"] <= 100 and v["num_eval"] == preset.clothing_test for v in doc["probe"].values())
    assert set(doc["summary"]) == {"dit", "sit", "clothing_dit"}
    for group, s in doc["summary"].items():
        assert "speedup" in s and set(s["speedup_per_seed"]) == {"0", "1"}, group
        lo, hi = s["speedup_ci90"]
        assert 0 <= lo <= hi, group
        assert all(a["speedup_ci90"][0] <= a["speedup_ci90"][1] for a in s["arms"].values()), group
    assert "usp_random" in doc["summary"]["dit"]["arms"]
    dose = doc["summary"]["dit"]["dose"]
    assert [d["pretrain_steps"] for d in dose] == [0, 3, 6]
    assert [d["arm"] for d in dose] == ["usp_random", "usp_pt3", "usp"]
    assert doc["pretrain"]["normpix_pt3"]["curve"][-1][0] == 3
    # dit and sit reach, usp and usp_no_ln beat scratch, usp beats usp_no_ln (usp_random is reported, never scored)
    assert all(isinstance(v, bool) for v in doc["goal"].values()) and len(doc["goal"]) == 5, doc["goal"]

    samples = _picture(out / doc["files"]["samples"])
    assert samples.shape[0] >= (4 + len(expected)) * 128  # real + recon rows per dataset, then one row per arm
    curves = _picture(out / doc["files"]["curves"])
    assert curves.shape[1] > curves.shape[0]  # three groups side by side
    _picture(out / doc["files"]["restoration"])
    _picture(out / doc["files"]["dose"])
    table = (out / doc["files"]["table"]).read_text()
    assert all(f"| {name} |" in table for name in expected)

    # a rerun continues: nothing is trained or evaluated again, and the numbers are the same
    ckpt = next((work / "dit_usp_seed1" / "checkpoints").glob("step_*"))
    mtime = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    again = json.loads(Path(run_fidelity("smoke", work=work, out=out)["results"]).read_text())
    printed = capsys.readouterr().out
    assert "training steps" not in printed and "evaluating step" not in printed and "pretraining" not in printed
    assert "(0 generator runs to do" in printed  # the estimate leaves out what the work folder holds
    assert ckpt.stat().st_mtime_ns == mtime
    assert {k: a["fid"] for k, a in again["arms"].items()} == {k: a["fid"] for k, a in doc["arms"].items()}


def test_absent_shared_data_skips_cleanly(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"name: p\nshared: {tmp_path / 'nowhere'}\n")
    result = run_fidelity(str(preset), work=tmp_path / "w", out=tmp_path / "o")
    assert "skipped" in result and "nowhere" in result["skipped"]
    assert "skipping the fidelity experiment" in capsys.readouterr().out
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_bad_preset_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ngenerate: {dit_arms: [scratch, usp_magic]}\n")
    with pytest.raises(ConfigError, match=r"generate.dit_arms: unknown arm\(s\) \['usp_magic'\]"):
        load_preset(str(bad))
    bad.write_text("name: bad\neval: {checkpoint: 5}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'eval.checkpoint'"):
        load_preset(str(bad))
    with pytest.raises(ConfigError, match="presets: .*cpu.*smoke"):
        load_preset("no_such_preset")


def test_every_shipped_preset_loads():
    for name in ("smoke", "cpu", "cpu-ablations", "gpu"):
        p, _ = load_preset(name)
        assert p.pretrain_resolution * 8 == p.resolution * 7, name  # the paper's 224 -> 256 geometry
        assert p.eval.checkpoints >= (2 if name == "smoke" else 4), name
        assert len(p.seeds) >= 2, name


def test_presets_fit_their_budgets():
    cpu, _ = load_preset("cpu")
    g = cpu.generate
    assert len(cpu.seeds) == 3 and g.steps >= 1200
    assert {"scratch", "usp", "usp_random"} <= set(g.dit_arms) and {"scratch", "usp", "usp_random"} <= set(g.sit_arms)
    assert estimate(cpu)["total"] < 2 * 3600
    abl, _ = load_preset("cpu-ablations")
    assert {"usp_no_ln", "usp_no_normpix", "usp_reinit_last"} <= set(abl.generate.dit_arms)
    assert abl.work == "runs/fidelity-cpu" and abl.generate.steps == g.steps and abl.eval == cpu.eval
    assert {k: v for k, v in abl.generate.model_dump().items() if "arms" not in k and "dose" not in k} == {
        k: v for k, v in g.model_dump().items() if "arms" not in k and "dose" not in k}  # its cpu runs are reused
    gpu, _ = load_preset("gpu")
    assert estimate(gpu)["total"] < 3600 and gpu.eval.precision == "bf16" and gpu.eval.sampling_steps == 50
    assert len(gpu.generate.dit_arms) + len(gpu.generate.sit_arms) >= 4


def test_fast_fid_equals_the_reference_fid_and_fid_inf_fits_one_over_n():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 16))
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    x = rng.normal(0.3, 1.1, size=(20, 16))
    fast = FastFID(x, mu, sigma)
    assert fast() == pytest.approx(frechet_from_features(x, mu, sigma), rel=1e-6)
    idx = rng.integers(0, 20, 20)  # a bootstrap resample, repeats included
    assert fast(idx) == pytest.approx(frechet_from_features(x[idx], mu, sigma), rel=1e-6)

    class Exact:  # FID = 3 + 50 / n exactly: the fit's intercept is 3
        n = 100

        def __call__(self, idx=None):
            return 3 + 50 / (self.n if idx is None else len(idx))

    out = fid_infinity(Exact(), points=5, smallest=0.5, draws=2)
    assert out["fid_inf"] == pytest.approx(3.0) and out["fid_inf_slope"] == pytest.approx(50.0)
    assert [n for n, _ in out["fid_inf_points"]] == [50, 62, 75, 88, 100]


def test_steps_to_reach_interpolates_between_checkpoints():
    assert steps_to_reach([100, 200, 300], [90.0, 50.0, 40.0], 70.0) == pytest.approx(150.0)
    assert steps_to_reach([100, 200], [60.0, 50.0], 70.0) == 100.0  # already below at the first checkpoint
    assert steps_to_reach([100, 200], [90.0, 80.0], 70.0) is None


def test_summary_reports_speedup_and_the_papers_orderings():
    def arm(fids):
        return {"steps": [100, 200, 300, 400], "fid": fids}

    doc = {"arms": {"dit_scratch": arm([100, 90, 80, 70]), "dit_usp": arm([60, 50, 45, 40]),
                    "dit_usp_no_ln": arm([95, 85, 75, 65]), "dit_usp_no_normpix": arm([99, 91, 79, 71]),
                    "sit_scratch": arm([100, 90, 80, 70]), "sit_usp": arm([100, 90, 75, 69])}}
    summary, goal = summarize(doc)
    assert summary["dit"]["usp_steps_to_scratch_final"] == 100.0 and summary["dit"]["speedup"] == 4.0
    assert goal["dit: usp reaches scratch's final FID within 1/4 of the steps"] is True
    assert summary["sit"]["usp_steps_to_scratch_final"] == pytest.approx(300 + 100 * 5 / 6)
    assert goal["sit: usp reaches scratch's final FID within 1/4 of the steps"] is False
    assert goal["dit: usp_no_ln beats scratch at every checkpoint"] is True
    assert goal["dit: usp_no_normpix beats scratch at every checkpoint"] is False  # 91 > 90 at step 200
    assert goal["dit: usp beats usp_no_ln (final FID)"] and goal["dit: usp beats usp_no_normpix (final FID)"]
