"""Bad input is one line naming the file or key and what was expected (a UserError, exit 2 from the command line),
never a traceback or a silent misbehaviour: damaged configs, caches, exports and VAE folders, the advice for a
missing cache, flat image folders where labels are needed, batches that do not split over the ranks."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import RESOLUTION, make_cfg, one_line_exit_2
from usp_fast.cli import main
from usp_fast.errors import ConfigError, DataError, UserError


def truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


# ---- 1. config files ----
@pytest.mark.parametrize("content, expected", [
    (b"\x80\x81\xff", "not a text file"),  # was a UnicodeDecodeError traceback
    (b"a: [1\nb: 2\n", "not valid YAML at line 2"),  # was a many-line message
    (b"- a\n- b\n", "must be a mapping"),
    (b"just a string\n", "must be a mapping"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    err = one_line_exit_2(capsys, ["config", "show", "--stage", "pretrain", "--config", str(path)])
    assert str(path) in err and expected in err, err
    with pytest.raises(ConfigError):
        main(["--debug", "config", "show", "--stage", "pretrain", "--config", str(path)])


# ---- 2, 3. damaged caches ----
@pytest.fixture
def cache_copy(tmp_path, built_cache, tiny_vae_dir):
    """A copy of the shared test cache and the config that built it (pointing at the copy)."""
    shutil.copytree(built_cache.data.cache_dir, tmp_path / "cache")  # make_cfg's data.cache_dir
    return make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, stage="cache")


def test_a_damaged_cache_manifest_names_it_and_the_advice_rewrites_it(cache_copy):
    from usp_fast.data.cache import open_cache
    from usp_fast.data.prepare import check_data_source
    from usp_fast.stages.cache import CacheStage

    cache_dir = Path(cache_copy.data.cache_dir)
    good = json.loads((cache_dir / "manifest.json").read_text())
    truncate(cache_dir / "manifest.json")  # was a JSONDecodeError traceback
    for attempt in (lambda: open_cache(cache_dir, cache_copy),
                    lambda: check_data_source(cache_copy.data, need_images=False, need_labels=True),
                    lambda: CacheStage(cache_copy).run()):
        with pytest.raises(DataError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and str(cache_dir / "manifest.json") in msg and "--stage cache" in msg, msg
    (cache_dir / "manifest.json").unlink()  # the advice: delete it, run --stage cache with the same config
    CacheStage(cache_copy).run()
    _, manifest = open_cache(cache_dir, cache_copy)
    assert manifest["count"] == good["count"] and manifest["latent_mean"] == good["latent_mean"]


def test_a_truncated_cache_shard_names_it_and_the_advice_rebuilds_it(cache_copy):
    from usp_fast.data.cache import open_cache
    from usp_fast.stages.cache import CacheStage

    cache_dir = Path(cache_copy.data.cache_dir)
    shard = cache_dir / "shard_00001.npy"
    before = np.load(shard)
    truncate(shard)  # was "ValueError: mmap length is greater than file size", in a loader worker
    with pytest.raises(DataError) as e:
        open_cache(cache_dir, cache_copy)
    msg = str(e.value)
    assert "\n" not in msg and str(shard) in msg and "--stage cache" in msg and "shard_00001.json" in msg, msg
    for name in ("shard_00001.npy", "shard_00001.json", "manifest.json"):  # the advice, word for word
        assert name in msg
        (cache_dir / name).unlink()
    CacheStage(cache_copy).run()
    cache, _ = open_cache(cache_dir, cache_copy)
    np.testing.assert_allclose(np.load(shard), before, rtol=0, atol=1e-3)  # the same shard again
    assert len(cache) == 40


def test_a_damaged_shard_record_names_it(cache_copy):
    from usp_fast.data.cache import open_cache

    cache_dir = Path(cache_copy.data.cache_dir)
    truncate(cache_dir / "shard_00000.json")
    with pytest.raises(DataError, match="shard_00000.json: damaged"):
        open_cache(cache_dir, cache_copy)


# ---- 4. damaged exports ----
@pytest.mark.parametrize("name", ["encoder.safetensors", "encoder.json"])
def test_a_damaged_encoder_export_names_the_file(tmp_path, name):
    from usp_fast.artifacts import ExportError, load_encoder, save_encoder
    from usp_fast.models.usp_vit import build_model

    out = save_encoder(build_model("usp_vit_test", in_chans=4, input_size=8), tmp_path / "export", "usp_vit_test")
    truncate(out / name)  # was a SafetensorError / JSONDecodeError traceback
    with pytest.raises(ExportError) as e:
        load_encoder(out)
    assert str(out / name) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("name, ema", [("ema.safetensors", True), ("model.safetensors", False),
                                       ("generator.json", True)])
def test_a_damaged_generator_export_names_the_file(tmp_path, name, ema):
    from usp_fast.artifacts import ExportError, load_generator_weights, save_generator

    weights = {"w": torch.zeros(4, 4)}
    out = save_generator(tmp_path / "generator", weights, weights, {"model": "DiT-Test/2"})
    assert load_generator_weights(out, ema)[0]["w"].shape == (4, 4)
    truncate(out / name)
    with pytest.raises(ExportError) as e:
        load_generator_weights(out, ema)
    assert str(out / name) in str(e.value) and "\n" not in str(e.value)


# ---- 5. the advice for a missing cache, with a generate config ----
def test_the_missing_cache_advice_of_a_generate_config_works(tmp_path, capsys, demo_images, tiny_vae_dir):
    config = {
        "run": {"name": "g", "out_dir": str(tmp_path / "runs")},
        "data": {"root": str(demo_images), "cache_dir": str(tmp_path / "cache"), "resolution": RESOLUTION,
                 "num_workers": 0},
        "vae": {"name": str(tiny_vae_dir), "encode_batch": 8},
        "cache": {"shard_size": 16},
        "model": {"name": "DiT-Test/2"},  # not a pretrain encoder: --stage cache used to refuse the file
        "generate": {"init": "random"},
        "ema": {"decay": 0.9},
        "sample": {"num_images": 4, "batch": 4, "grid": 4},
        "optim": {"lr": 1e-3, "warmup_epochs": 0, "schedule": "constant"},
        "train": {"epochs": 1000, "max_steps": 1, "global_batch": 8, "micro_batch": 8, "zero_stage": 0,
                  "log_every": 1, "ckpt_every": 1000},
    }
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(config))
    err = one_line_exit_2(capsys, ["train", "--stage", "generate", "--config", str(path)])
    assert "usp-fast train --stage cache" in err and "same config file" in err, err
    main(["train", "--stage", "cache", "--config", str(path)])  # the advice
    result = main(["train", "--stage", "generate", "--config", str(path)])  # now it trains
    assert Path(result["generator"]).is_dir()


# ---- 6. flat image folders ----
@pytest.fixture
def flat_folder(tmp_path, demo_images):
    """Images directly in the folder, no class subfolders (as ImageNet's val/)."""
    flat = tmp_path / "val"
    flat.mkdir()
    from usp_fast.data.images import image_files

    for i, p in enumerate(image_files(demo_images)[:6]):
        shutil.copy(p, flat / f"{i:02d}{p.suffix}")
    return flat


def test_a_flat_folder_is_refused_only_where_labels_are_needed(tmp_path, flat_folder, built_cache, tiny_vae_dir,
                                                               monkeypatch):
    from usp_fast.data.cache import build_cache, check_manifest
    from usp_fast.data.images import image_files, list_images
    from usp_fast.stages.finetune import FinetuneStage
    from usp_fast.stages.generate import GenerateStage
    from usp_fast.stages.pretrain import PretrainStage
    from usp_fast.stages.probe import ProbeStage
    from usp_fast.vae import load_vae

    items, classes = list_images(flat_folder)  # label-free uses keep working
    assert len(items) == 6 and {y for _, y in items} == {0} and len(image_files(flat_folder)) == 6
    with pytest.raises(DataError, match="one subfolder per class") as e:
        list_images(flat_folder, need_labels=True)
    assert str(flat_folder) in str(e.value)

    monkeypatch.setattr("usp_fast.vae.load_vae", lambda *a, **k: pytest.fail("the VAE must not load here"))
    online = ["data.source=online", "model.name=DiT-Test/2"]
    with pytest.raises(DataError, match="generate.unconditional=true"):  # class-conditional: refused
        GenerateStage(make_cfg(tmp_path, flat_folder, tiny_vae_dir, *online, stage="generate")).check_inputs()
    GenerateStage(make_cfg(tmp_path, flat_folder, tiny_vae_dir, *online, "generate.unconditional=true",
                           stage="generate")).check_inputs()
    PretrainStage(make_cfg(tmp_path, flat_folder, tiny_vae_dir, "data.source=online")).check_inputs()
    monkeypatch.undo()

    # a cache of the flat folder (pretraining, unconditional generation) records that it has no labels ...
    val = make_cfg(tmp_path, flat_folder, tiny_vae_dir, f"data.cache_dir={tmp_path / 'val_cache'}", stage="cache")
    build_cache(val, load_vae(str(tiny_vae_dir)), torch.device("cpu"))
    assert check_manifest(val.data.cache_dir, val)["labelled"] is False
    assert check_manifest(built_cache.data.cache_dir, built_cache)["labelled"] is True
    # ... so stages that train or evaluate on labels refuse it before anything loads
    on_flat = [f"data.root={flat_folder}", f"data.cache_dir={val.data.cache_dir}"]
    with pytest.raises(DataError, match="no class subfolders") as e:
        GenerateStage(make_cfg(tmp_path, flat_folder, tiny_vae_dir, *on_flat, "model.name=DiT-Test/2",
                               stage="generate")).check_inputs()
    assert str(val.data.cache_dir) in str(e.value) and "\n" not in str(e.value)
    labelled = [f"data.root={built_cache.data.root}", f"data.cache_dir={built_cache.data.cache_dir}"]
    with pytest.raises(DataError, match="finetune.val_cache_dir: .*no class subfolders"):
        FinetuneStage(make_cfg(tmp_path, flat_folder, tiny_vae_dir, *labelled, f"finetune.encoder={tmp_path}",
                               f"finetune.val_cache_dir={val.data.cache_dir}", stage="finetune")).check_inputs()
    with pytest.raises(DataError, match="probe.val_cache_dir: .*no class subfolders"):
        ProbeStage(make_cfg(tmp_path, flat_folder, tiny_vae_dir, *labelled, f"probe.encoder={tmp_path}",
                            f"probe.val_cache_dir={val.data.cache_dir}", stage="probe")).check_inputs()
    with pytest.raises(DataError, match="no class subfolders"):
        ProbeStage(make_cfg(tmp_path, flat_folder, tiny_vae_dir, *on_flat, f"probe.encoder={tmp_path}",
                            stage="probe")).check_inputs()
    PretrainStage(make_cfg(tmp_path, flat_folder, tiny_vae_dir, *on_flat)).check_inputs()  # pretraining may


# ---- 7. a VAE that is not here ----
@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # (read at import: the variables alone may come too late)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_the_missing_default_vae_says_which_key_and_how_to_get_it(tmp_path, capsys, offline_empty_hub,
                                                                  demo_images):
    from usp_fast.vae import VAEError, load_vae

    with pytest.raises(VAEError) as e:
        load_vae("stabilityai/sd-vae-ft-ema")
    msg = str(e.value)
    assert "\n" not in msg and "vae.name=DIR" in msg, msg
    assert "hf download stabilityai/sd-vae-ft-ema --local-dir DIR" in msg, msg
    err = one_line_exit_2(capsys, ["train", "--stage", "cache", "--config", str(Path(__file__).parents[1] / "configs"
                                   / "pretrain" / "vit_b.yaml"), f"data.root={demo_images}",
                                   f"data.cache_dir={tmp_path / 'c'}", f"run.out_dir={tmp_path / 'runs'}"])
    assert "vae.name=stabilityai/sd-vae-ft-ema" in err and "hf download" in err, err
    with pytest.raises(VAEError, match="no such folder"):  # a path, not a hub id
        load_vae(str(tmp_path / "weights" / "sd-vae"))


def test_a_damaged_local_vae_folder_is_one_line(tmp_path, tiny_vae_dir):
    from usp_fast.vae import VAEError, load_vae

    vae = tmp_path / "vae"
    shutil.copytree(tiny_vae_dir, vae)
    (weights,) = vae.glob("diffusion_pytorch_model.*")
    truncate(weights)  # was an OSError traceback from diffusers
    with pytest.raises(VAEError, match="not a loadable diffusers AutoencoderKL folder") as e:
        load_vae(str(vae))
    assert str(vae) in str(e.value) and "\n" not in str(e.value)
    weights.unlink()
    with pytest.raises(VAEError, match="not a loadable"):
        load_vae(str(vae))
    taesd = tmp_path / "taesd"
    taesd.mkdir()
    for name in ("x_encoder.pth", "x_decoder.pth"):
        (taesd / name).write_bytes(b"not a state dict")  # was an UnpicklingError traceback
    with pytest.raises(VAEError, match="x_encoder.pth cannot be read"):
        load_vae(str(taesd))


# ---- 8. batches that do not split over the ranks ----
@pytest.fixture
def clean_launcher_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_global_batch_that_does_not_split_over_the_world_fails_at_load(tmp_path, capsys, built_cache,
                                                                         tiny_vae_dir, clean_launcher_env):
    from usp_fast.stages.pretrain import PretrainStage
    from usp_fast.stages.probe import ProbeStage

    env = clean_launcher_env
    data = [f"data.cache_dir={built_cache.data.cache_dir}"]
    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, *data)  # global 8, micro 4
    PretrainStage(cfg).check_inputs()  # one process: fine
    env.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError) as e:
        PretrainStage(cfg).check_inputs()
    msg = str(e.value)
    for part in ("train.global_batch 8", "train.micro_batch 4", "3 ranks", "WORLD_SIZE=3", "12, 24, 36"):
        assert part in msg, msg
    twelve = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, *data, "train.global_batch=12")
    PretrainStage(twelve).check_inputs()  # 12 = 4 x 3: fine
    ProbeStage(make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, *data, f"probe.encoder={tmp_path}",
                        stage="probe")).check_inputs()  # the probe trains in one process: any world

    # from the command line: one line, before any process group (or model, or data) is set up
    env.setattr("usp_fast.dist.init", lambda *a, **k: pytest.fail("the batch check came after dist.init"))
    args = [f"{k}={v}" for k, v in (("run.out_dir", tmp_path / "runs"), ("data.root", built_cache.data.root),
                                    ("data.cache_dir", built_cache.data.cache_dir), ("vae.name", tiny_vae_dir))]
    err = one_line_exit_2(capsys, ["train", "--stage", "pretrain", "--config", str(Path(__file__).parents[1]
                                   / "configs" / "pretrain" / "demo.yaml"), *args, "data.demo_images=0",
                                   "train.global_batch=32", "train.micro_batch=8"])
    assert "train.global_batch 32" in err and "8 x 3 ranks" in err and "multiples of 24" in err, err

    env.delenv("WORLD_SIZE")  # srun: the step's tasks; a batch script outside a step is one process
    env.setenv("SLURM_NTASKS", "3")
    env.setenv("SLURM_PROCID", "0")
    PretrainStage(cfg).check_inputs()
    env.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(ConfigError, match="SLURM_NTASKS=3"):
        PretrainStage(cfg).check_inputs()
