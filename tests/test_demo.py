"""`usp-fast demo` (make demo): the whole chain with the weight-free pixels autoencoder, pictures that show the
photos, a summary naming every file, and a second run that reuses everything."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usp_fast.config import ConfigError
from usp_fast.demo import run_demo

REPO = Path(__file__).resolve().parents[1]


def _overrides(tmp_path):
    return [f"run.out_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'demo'}", "data.demo_images=24",
            "train.max_steps=6", "train.log_every=2", "train.ckpt_every=3", "sample.num_images=8", "sample.grid=8",
            "sample.steps=5", "sample.batch=8"]


def test_demo_runs_the_whole_chain_and_reuses_it(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(REPO)
    result = run_demo(_overrides(tmp_path))
    out = capsys.readouterr().out
    for what in ("restoration pictures", "sample grid", "pretrain loss curve", "generate loss curve", "evaluation",
                 "denoising pictures"):
        assert what in out and Path(result[what]).exists(), what
        assert result[what] in out
    assert np.isfinite(result["fid"]) and "FID of 8 samples" in out
    restoration = np.asarray(Image.open(result["restoration pictures"]).convert("RGB"))
    assert 6 * 64 <= restoration.shape[0] < 7 * 64 and restoration.std() > 20  # six rows of 64 px, real content
    row = restoration.shape[0] // 6
    first, last = restoration[:64, :64].astype(float), restoration[5 * row:5 * row + 64, :64].astype(float)
    assert np.abs(first - last).mean() > 10  # rows spread over the photo classes, not six crops of the first
    grid = np.asarray(Image.open(result["sample grid"]).convert("RGB"))
    assert grid.shape[0] == 4 * 64 and grid.std() > 5  # classes [0, 1, 2, 3]: one row each, 2 per row
    assert 0 < grid.mean() < 255 and json.loads((Path(result["sample grid"]).parent / "samples.json").read_text())[
        "clip_denoised"]  # pixels is bounded: sample.clip_denoised=auto clamps x0 to its range
    denoise = np.asarray(Image.open(result["denoising pictures"]).convert("RGB"))
    assert 6 * 64 <= denoise.shape[0] < 7 * 64 and denoise.std() > 20  # photos + five noise levels, 64 px rows
    for curve in ("pretrain loss curve", "generate loss curve"):
        assert np.asarray(Image.open(result[curve]).convert("RGB")).std() > 5

    again = run_demo(_overrides(tmp_path))
    assert set(again["timings"].values()) == {"reused"} and again["fid"] == result["fid"]


def test_demo_override_that_neither_config_has_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="neither demo config has the key 'sample.colour'"):
        run_demo(["sample.colour=red"])
