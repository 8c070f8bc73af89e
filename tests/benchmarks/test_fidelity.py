"""The fidelity experiment (benchmarks/fidelity.py): the smoke preset end to end on the real shared data (skipped
without ../shared), its resumption, the clean skip without the data, and the summary arithmetic."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usp_fast.errors import ConfigError
from usp_fast_benchmarks import fidelity
from usp_fast_benchmarks.fidelity import load_preset, run_fidelity, steps_to_reach, summarize

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
    doc = json.loads(Path(result["results"]).read_text())
    preset, _ = load_preset("smoke")
    steps = doc["eval_steps"]
    assert steps == [2, 4] and doc["preset"] == "smoke" and doc["commit"] is not None
    assert set(doc["phase_s"]) >= {"caches", "pretrain", "reference", "train_arms", "evaluate", "probe"}

    expected = {f"dit_{a}" for a in preset.generate.dit_arms} | {f"sit_{a}" for a in preset.generate.sit_arms} | {
        f"clothing_dit_{a}" for a in preset.generate.clothing_arms}
    assert set(doc["arms"]) == expected
    for name, arm in doc["arms"].items():
        assert arm["steps"] == steps, name
        assert all(np.isfinite(arm["fid"])) and all(f > 0 for f in arm["fid"]), name
        assert all(lo <= hi for lo, hi in zip(arm["fid_lo"], arm["fid_hi"])), name
        assert arm["loss_curve"][-1][0] == steps[-1], name
        assert arm["conditional"] == name.startswith("clothing"), name
    assert doc["arms"]["dit_scratch"]["transfer_notes"] is None
    no_ln = " ".join(doc["arms"]["dit_usp_no_ln"]["transfer_notes"])
    assert "LayerNorm" in no_ln and " ".join(doc["arms"]["dit_usp"]["transfer_notes"]) != no_ln
    for dataset in ("imagenet", "clothing"):
        floors = doc["reference"][dataset]["floors"]
        assert floors["recon"]["fid"] > 0 and floors["real_subset"]["fid"] > 0
    assert doc["reference"]["imagenet"]["real_images"] == preset.num_images
    for target in ("normpix", "raw"):
        assert doc["pretrain"][target]["curve"][-1][0] == preset.pretrain.steps
    assert set(doc["probe"]) == {"usp", "usp_no_normpix", "random_init"}
    assert all(0 <= v["top1"] <= 100 and v["num_eval"] == preset.clothing_test for v in doc["probe"].values())
    assert set(doc["summary"]) == {"dit", "sit", "clothing_dit"}
    assert all(isinstance(v, bool) for v in doc["goal"].values()) and len(doc["goal"]) == 8

    samples = _picture(out / doc["files"]["samples"])
    assert samples.shape[0] >= (4 + len(expected)) * 128  # real + recon rows per dataset, then one row per arm
    curves = _picture(out / doc["files"]["curves"])
    assert curves.shape[1] > curves.shape[0]  # three groups side by side
    _picture(out / doc["files"]["restoration"])
    table = (out / doc["files"]["table"]).read_text()
    assert all(f"| {name} |" in table for name in expected)

    # a rerun continues: nothing is trained or evaluated again, and the numbers are the same
    ckpt = next((work / "dit_usp" / "checkpoints").glob("step_*"))
    mtime = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    again = json.loads(Path(run_fidelity("smoke", work=work, out=out)["results"]).read_text())
    printed = capsys.readouterr().out
    assert "training steps" not in printed and "evaluating step" not in printed and "pretraining" not in printed
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
    for name in ("smoke", "cpu", "gpu"):
        p, _ = load_preset(name)
        assert p.pretrain_resolution * 8 == p.resolution * 7, name  # the paper's 224 -> 256 geometry
        assert p.eval.checkpoints >= (2 if name == "smoke" else 5), name


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
