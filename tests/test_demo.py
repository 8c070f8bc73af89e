"""`usp-fast demo` (make demo): the whole chain with the weight-free pixels autoencoder, pictures that show the
photos and the digits, a summary naming every file, a second run that reuses everything, and a generator whose
samples look like the digit they were asked for."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usp_fast.config import ConfigError
from usp_fast.demo import (
    GENERATE,
    class_means,
    nearest_class_mean_match,
    run_demo,
    sample_labels,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_logging():
    """The stages log to <run>/train.log and to the sys.stdout of the moment (capsys's, here): put the root
    logger's handlers back afterwards, so later tests do not write to a closed capture."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _overrides(tmp_path):
    return [f"run.out_dir={tmp_path / 'runs'}", f"pretrain:data.root={tmp_path / 'demo'}",
            "pretrain:data.demo_images=24", f"generate:data.root={tmp_path / 'demo_digits'}",
            "generate:data.demo_images=50", "train.global_batch=8",
            "train.micro_batch=8", "train.max_steps=6", "train.log_every=2", "train.ckpt_every=3",
            "sample.num_images=20", "sample.grid=20", "sample.steps=5", "sample.batch=10"]


def test_demo_runs_the_whole_chain_and_reuses_it(tmp_path, monkeypatch, capsys, one_thread, own_logging):
    monkeypatch.chdir(REPO)
    result = run_demo(_overrides(tmp_path))
    out = capsys.readouterr().out
    for what in ("restoration pictures", "sample grid", "sample grid, x4", "pretrain loss curve", "generate loss curve",
                 "evaluation", "denoising pictures", "class match", "restorations, x2"):
        assert what in out and Path(result[what]).exists(), what
        assert result[what] in out
    assert np.isfinite(result["fid"]) and "FID of 20 samples against 50 real digits" in out
    assert 0 <= result["class_match"] <= 1 and "nearest their own digit's mean picture" in out
    side = 32  # the photos at the pretrain demo's resolution
    restoration = np.asarray(Image.open(result["restoration pictures"]).convert("RGB"))
    assert 6 * side <= restoration.shape[0] < 7 * side and restoration.std() > 20  # six rows, real content
    row = restoration.shape[0] // 6
    first, last = restoration[:side, :side].astype(float), restoration[5 * row:5 * row + side, :side].astype(float)
    assert np.abs(first - last).mean() > 10  # rows spread over the photo classes, not six crops of the first
    grid = np.asarray(Image.open(result["sample grid"]).convert("RGB"))
    assert grid.shape[0] == 10 * 16 and grid.std() > 5  # classes 0..9: one row of 16 px digits each, 2 per row
    assert np.array_equal(np.asarray(Image.open(result["sample grid, x4"]).convert("RGB"))[::4, ::4], grid)
    info = json.loads((Path(result["sample grid"]).parent / "samples.json").read_text())
    assert info["classes"] == list(range(10)) and info["image_size"] == 16
    denoise = np.asarray(Image.open(result["denoising pictures"]).convert("RGB"))
    assert 6 * 16 <= denoise.shape[0] < 7 * 16 and denoise.std() > 20  # digits + five noise levels, 16 px rows
    for curve in ("pretrain loss curve", "generate loss curve"):
        assert np.asarray(Image.open(result[curve]).convert("RGB")).std() > 5
    digits = sorted(p.name for p in Path(result["demo digits"]).iterdir())
    assert digits == [f"digit{k}" for k in range(10)]

    again = run_demo(_overrides(tmp_path))
    assert set(again["timings"].values()) == {"reused"} and again["fid"] == result["fid"]


def test_demo_override_that_neither_config_has_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="neither demo config has the key 'sample.colour'"):
        run_demo(["sample.colour=red"])
    with pytest.raises(ConfigError, match="the pretrain demo config has no key 'sample.steps'"):
        run_demo(["pretrain:sample.steps=3"])


def test_nearest_class_mean_match_is_chance_for_noise_and_one_for_class_means():
    rng = np.random.default_rng(0)
    means = rng.uniform(-1, 1, (10, 16, 16))
    labels = np.repeat(np.arange(10), 20)
    exact = np.repeat(((means[labels] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)[..., None], 3, -1)
    assert nearest_class_mean_match(exact, labels, means) == 1.0
    noise = rng.integers(0, 256, (200, 16, 16, 3), dtype=np.uint8)
    assert nearest_class_mean_match(noise, labels, means) < 0.25
    same = np.repeat(exact[:1], 200, 0)  # one picture for every class
    assert nearest_class_mean_match(same, labels, means) == 0.1


def test_the_demo_generator_draws_the_digit_it_is_asked_for(tmp_path, monkeypatch, one_thread, own_logging):
    """A shorter run of the generate demo's recipe (random init instead of the pretrain export, 250 steps instead
    of 600): its samples must differ by class and most must lie nearest their own digit's mean picture (chance:
    10%). Noise, an unconditional blur or one picture for all classes fail."""
    from usp_fast.sampling import run as sample_run
    from usp_fast.stages import load_config, run_stage

    monkeypatch.chdir(REPO)
    overrides = [f"run.out_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'demo_digits'}", "generate.init=random",
                 "train.max_steps=250", "train.ckpt_every=250", "sample.num_images=50", "sample.batch=50",
                 "sample.grid=50", "sample.steps=25", f"sample.out_dir={tmp_path / 'samples'}"]
    run_stage("generate", GENERATE, overrides)
    cfg = load_config(GENERATE, overrides, stage="generate")
    sample_run(cfg, "cpu")
    samples = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    labels = np.asarray(sample_labels(cfg.sample, len(samples)))
    means = class_means(tmp_path / "demo_digits" / "train", cfg.data.resolution)
    match = nearest_class_mean_match(samples, labels, means)
    grey = samples.astype(float).mean(-1)
    by_class = np.stack([grey[labels == c].mean(0) for c in range(10)])
    apart = np.abs(by_class[:, None] - by_class[None]).mean((-2, -1))[~np.eye(10, dtype=bool)]
    print(f"nearest-class-mean match {match:.2f}, class-average pictures differ by {apart.min():.1f}..."
          f"{apart.max():.1f} grey levels")
    assert match >= 0.3, match  # chance is 0.1
    assert apart.min() > 5  # every pair of classes gives visibly different pictures on average
