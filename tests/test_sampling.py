"""usp_fast/sampling.py: deterministic per seed on any rank count, finite, CFG scale 1 = conditional, ADM .npz,
resumable after a kill on any rank count."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gen_cfg
from usp_fast.diffusion import create_objective
from usp_fast import sampling
from usp_fast.errors import UserError
from usp_fast.pictures import image_grid
from usp_fast.stages.generate import GenerateStage
from usp_fast.sampling import Sampler, batch_generator, load_generator, merge_shards, run, sample_latents, shard_path
from usp_fast.vae import LatentNorm


pytestmark = pytest.mark.usefixtures("one_thread")


def _make_generator(tmp_path, cache_cfg, model_name, *overrides):
    """Write a generator/ folder for a randomly weighted tiny model (no training: the output layer is non-zero so
    samples depend on the model). -> config_with(*more_overrides), the sampling config of that run."""
    base = [f"model.name={model_name}", "sample.num_images=6", "sample.batch=4", "sample.steps=4", "sample.grid=6",
            *overrides]

    def config_with(*more):
        return gen_cfg(tmp_path, cache_cfg, *base, *more)

    cfg = config_with()
    manifest = json.loads((Path(cache_cfg.data.cache_dir) / "manifest.json").read_text())
    task = GenerateStage(cfg)
    torch.manual_seed(0)
    model = task.build_model(manifest, LatentNorm())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    task.ema_weights = {n: p.detach() * 0.5 for n, p in model.named_parameters()}  # an EMA unlike the weights
    task.finish(model, Path(cfg.run.out_dir) / cfg.run.name, manifest, LatentNorm(), 7, 1.0)
    return config_with


@pytest.fixture(scope="module")
def dit_cfg(tmp_path_factory, built_cache):
    return _make_generator(tmp_path_factory.mktemp("dit"), built_cache, "DiT-Test/2")


def test_sample_writes_adm_npz_and_grid_deterministically(dit_cfg, tmp_path):
    a = run(dit_cfg(f"sample.out_dir={tmp_path / 'a'}"))
    images = np.load(a["npz"])["arr_0"]
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 0
    assert Path(a["grid"]).is_file()
    info = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert info["method"] == "ddpm" and info["step"] == 7 and info["ema"] is True
    b = run(dit_cfg(f"sample.out_dir={tmp_path / 'b'}"))
    assert np.array_equal(np.load(b["npz"])["arr_0"], images)
    c = run(dit_cfg(f"sample.out_dir={tmp_path / 'c'}", "sample.seed=1"))
    assert not np.array_equal(np.load(c["npz"])["arr_0"], images)


def test_two_ranks_make_the_same_images_as_one(dit_cfg, tmp_path):
    one = run(dit_cfg(f"sample.out_dir={tmp_path / 'one'}", "sample.method=ddim"))
    sampler = Sampler(dit_cfg(f"sample.out_dir={tmp_path / 'two'}", "sample.method=ddim"))
    sampler.open_output()
    for rank in (1, 0):  # rank 1 makes batch 1 (images 4-5), rank 0 batch 0 (images 0-3)
        sampler.fill(rank, 2)
    two = sampler.finalize(world=2)
    assert np.array_equal(np.load(two["npz"])["arr_0"], np.load(one["npz"])["arr_0"])


class Preempted(Exception):
    pass


def _record_batches(monkeypatch, die_after=None):
    """Patch sample_latents to record the global batches made, and to raise Preempted (a killed rank) when asked
    for one more after `die_after`. -> the list of batch indices made."""
    real, made = sampling.sample_latents, []

    def sample_latents(model, objective, scfg, method, k, *args, **kwargs):
        if len(made) == die_after:
            raise Preempted
        made.append(k)
        return real(model, objective, scfg, method, k, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_latents", sample_latents)
    return made


def test_a_killed_run_resumes_on_any_rank_count_to_the_same_npz(dit_cfg, tmp_path, monkeypatch, caplog):
    sizes = ("sample.num_images=10", "sample.batch=2")  # 5 batches: of 2 ranks, rank 0 makes 0, 2, 4, rank 1 1, 3
    whole = run(dit_cfg(f"sample.out_dir={tmp_path / 'whole'}", *sizes))
    killed = Sampler(dit_cfg(f"sample.out_dir={tmp_path / 'one'}", *sizes))
    killed.open_output()
    for rank, die_after in ((1, 1), (0, 2)):  # rank 1 dies after its first batch, rank 0 after its second
        with monkeypatch.context() as m, pytest.raises(Preempted):
            _record_batches(m, die_after)
            killed.fill(rank, 2)
    assert sorted(p.name for p in killed.shards.iterdir()) == [
        "batch_000000.npy", "batch_000001.npy", "batch_000002.npy", "plan.json"]
    shutil.copytree(tmp_path / "one", tmp_path / "two")  # the same killed run, to resume on 2 ranks

    caplog.set_level(logging.INFO, logger="usp_fast.sampling")
    one = run(dit_cfg(f"sample.out_dir={tmp_path / 'one'}", *sizes))  # resumed on 1 rank
    assert "3 of 5 batches already done" in caplog.text
    resumed = Sampler(dit_cfg(f"sample.out_dir={tmp_path / 'two'}", *sizes))
    resumed.open_output()
    with monkeypatch.context() as m:
        made = _record_batches(m)
        for rank in (0, 1):
            resumed.fill(rank, 2)
    assert made == [4, 3]  # only the missing batches
    two = resumed.finalize(world=2)

    want = np.load(whole["npz"])["arr_0"]
    for got, folder in ((one, tmp_path / "one"), (two, tmp_path / "two")):
        assert np.array_equal(np.load(got["npz"])["arr_0"], want)
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "samples.json", "samples.npz"]


def test_the_grid_is_the_first_rows_of_the_npz(dit_cfg, tmp_path):
    from PIL import Image

    out = run(dit_cfg(f"sample.out_dir={tmp_path}", "sample.num_images=10", "sample.batch=4", "sample.grid=5"))
    first = np.load(out["npz"])["arr_0"][:5]  # from 2 of the 3 batches
    assert np.array_equal(np.asarray(Image.open(out["grid"]).convert("RGB")), image_grid(first))


def test_torn_or_unfinished_shards_are_made_again_and_a_complete_set_only_merged(dit_cfg, tmp_path, monkeypatch):
    cfg = dit_cfg(f"sample.out_dir={tmp_path}", "sample.num_images=10", "sample.batch=4")
    sampler = Sampler(cfg)
    sampler.open_output()
    sampler.fill()
    want = np.concatenate([np.load(shard_path(sampler.shards, k)) for k in range(3)])
    torn = shard_path(sampler.shards, 1)
    torn.write_bytes(torn.read_bytes()[:1000])  # a copy cut short
    shard_path(sampler.shards, 2).rename(sampler.shards / ".batch_000002.npy.tmp999")  # killed before its rename
    with pytest.raises(UserError, match="2 of 3 batches are missing or incomplete"):
        merge_shards(tmp_path)
    with monkeypatch.context() as m:
        made = _record_batches(m)
        sampler.fill()
        assert made == [1, 2]
        out = run(cfg)  # killed before the merge: the rerun finds every batch and only merges
    assert made == [1, 2]
    assert np.array_equal(np.load(out["npz"])["arr_0"], want)


def test_other_samples_in_the_same_out_dir_are_refused(dit_cfg, tmp_path):
    Sampler(dit_cfg(f"sample.out_dir={tmp_path}")).open_output()
    Sampler(dit_cfg(f"sample.out_dir={tmp_path}", "sample.grid=3")).open_output()  # the same images: resumes
    with pytest.raises(UserError, match=r"\(seed 0 -> 1; steps 4 -> 8\)") as e:
        Sampler(dit_cfg(f"sample.out_dir={tmp_path}", "sample.seed=1", "sample.steps=8")).open_output()
    assert "\n" not in str(e.value)


def test_the_same_command_after_it_finished_keeps_the_samples_and_other_settings_are_refused(dit_cfg, tmp_path,
                                                                                             monkeypatch):
    first = run(dit_cfg(f"sample.out_dir={tmp_path}"))
    npz = Path(first["npz"])
    before = (npz.stat().st_mtime_ns, npz.read_bytes())
    monkeypatch.setattr("usp_fast.sampling.sample_latents", lambda *a, **k: pytest.fail("sampled again"))
    again = run(dit_cfg(f"sample.out_dir={tmp_path}"))
    assert again == first and (npz.stat().st_mtime_ns, npz.read_bytes()) == before
    with pytest.raises(UserError, match=r"finished samples of other settings \(seed 0 -> 1\)") as e:
        run(dit_cfg(f"sample.out_dir={tmp_path}", "sample.seed=1"))
    assert "\n" not in str(e.value) and npz.read_bytes() == before[1]


def test_another_vae_than_the_model_was_trained_on_is_a_user_error(dit_cfg):
    with pytest.raises(UserError, match=r"^vae.name=pixels \(fingerprint \w+\) is not the VAE this model was "
                                        r"trained on: set vae.name=\S*tiny_vae"):
        Sampler(dit_cfg("vae.name=pixels"))


def test_ema_weights_are_the_default(dit_cfg):
    cfg = dit_cfg()
    path = Path(cfg.run.out_dir) / cfg.run.name / "generator"
    ema, _ = load_generator(path, use_ema=True)
    raw, _ = load_generator(path, use_ema=False)
    torch.testing.assert_close(ema.blocks[0].attn.qkv.weight, 0.5 * raw.blocks[0].attn.qkv.weight)
    assert torch.equal(ema.pos_embed, raw.pos_embed)


@pytest.mark.parametrize("model_name, method", [("DiT-Test/2", "ddpm"), ("DiT-Test/2", "ddim"),
                                                ("SiT-Test/2", "sde"), ("SiT-Test/2", "ode-heun"),
                                                ("SiT-Test/2", "ode-euler")])
def test_samplers_deterministic_per_seed_finite_and_cfg1_is_conditional(tmp_path, built_cache, model_name, method):
    config_with = _make_generator(tmp_path, built_cache, model_name, f"sample.method={method}")
    cfg = config_with()
    model, meta = load_generator(Path(cfg.run.out_dir) / "g" / "generator")
    objective = create_objective(meta["objective"], model.cfg.learn_sigma)
    scfg = cfg.sample
    x1, y1 = sample_latents(model, objective, scfg, method, 3, 2, torch.device("cpu"))
    x2, _ = sample_latents(model, objective, scfg, method, 3, 2, torch.device("cpu"))
    assert torch.isfinite(x1).all() and torch.equal(x1, x2)
    # scale 1 is exactly plain conditional sampling with the same noise, labels and sampler noise
    gen = batch_generator(scfg.seed, 3, "cpu")
    noise = torch.randn((2, 4, 8, 8), generator=gen)
    labels = torch.randint(0, model.cfg.num_classes, (2,), generator=gen)
    assert torch.equal(labels, y1)
    plain = objective.sample(lambda x, t: model(x, t, labels), noise, method, scfg.steps, gen)
    assert torch.equal(x1, plain)
    guided, _ = sample_latents(model, objective, config_with("sample.cfg_scale=4.0").sample, method, 3, 2,
                               torch.device("cpu"))
    assert torch.isfinite(guided).all() and not torch.allclose(guided, x1)


def test_fixed_classes_give_one_labelled_row_per_class(dit_cfg, tmp_path):
    from PIL import Image

    from usp_fast.sampling import fixed_class

    cfg = dit_cfg(f"sample.out_dir={tmp_path / 'fixed'}", "sample.classes=[1, 0]", "sample.grid=6")
    assert [fixed_class(cfg.sample, i) for i in range(8)] == [1, 1, 1, 0, 0, 0, 1, 1]  # rows of grid/2 = 3
    model, _ = load_generator(Sampler(cfg).ckpt)
    latents, labels = sample_latents(model, create_objective("ddpm", True), cfg.sample, "ddpm", 1, 4,
                                     torch.device("cpu"))
    assert labels.tolist() == [0, 0, 1, 1]  # batch 1 of size 4 holds images 4..7
    out = run(cfg)
    grid = np.asarray(Image.open(out["grid"]))
    plain = run(dit_cfg(f"sample.out_dir={tmp_path / 'plain'}", "sample.grid=6"))
    plain_grid = np.asarray(Image.open(plain["grid"]))
    assert plain_grid.shape == (2 * 64, 3 * 64, 3)  # 6 images: ceil(sqrt(6)) = 3 per row
    assert grid.shape[0] == 2 * 64 and grid.shape[1] > 3 * 64  # 2 class rows of 3, plus the label strip on the left
    assert grid[:, : grid.shape[1] - 3 * 64].std() > 0  # the labels are drawn
    assert json.loads((tmp_path / "fixed" / "samples.json").read_text())["classes"] == [1, 0]


def test_classes_outside_the_model_or_for_an_unconditional_model_are_refused(dit_cfg, tmp_path):
    cfg = dit_cfg(f"sample.out_dir={tmp_path / 'x'}", "sample.classes=[99]")
    model, _ = load_generator(Sampler(cfg).ckpt)
    with pytest.raises(UserError, match=r"sample.classes \[99\]"):
        sample_latents(model, create_objective("ddpm", True), cfg.sample, "ddpm", 0, 2, torch.device("cpu"))


@pytest.mark.parametrize("objective_name", ["ddpm", "linear"])
def test_one_step_x0_inverts_an_exact_model(objective_name):
    """A model that returns the true epsilon (DDPM) or velocity (SiT) gives back the clean latents at every
    noise level of the denoising picture."""
    from usp_fast.sampling import NOISE_LEVELS, one_step_x0

    objective = create_objective(objective_name, True)
    x0 = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    for level in NOISE_LEVELS:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        truth = noise if objective_name == "ddpm" else x0 - noise  # SiT: v = x1 - eps

        def model(x_t, t, y, truth=truth):
            return torch.cat([truth, torch.zeros_like(truth)], 1)

        got = one_step_x0(model, objective, x0, torch.zeros(3, dtype=torch.long), level,
                          torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, x0, rtol=0, atol=2e-4 if level > 0.8 else 1e-5)
