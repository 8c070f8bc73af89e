from pathlib import Path

import pytest
import yaml

from usp_fast.config import ConfigError, to_dict
from usp_fast.stages import STAGES, describe_keys, keys_markdown, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def test_unknown_key_names_file_and_lists_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  micro_bach: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "train.micro_bach" in msg and "micro_batch" in msg and "global_batch" in msg
    assert "\n" not in msg


def test_mistyped_choice_fails_at_load_listing_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.schedule=cosin"])
    assert "optim.schedule" in str(e.value) and "'cosine'" in str(e.value) and "'constant'" in str(e.value)
    with pytest.raises(ConfigError, match="usp_vit_b"):
        load_config(None, ["model.name=usp_vit_q"])
    with pytest.raises(ConfigError, match="unknown key 'model.mask_ratoi'.*mask_ratio"):
        load_config(None, ["model.mask_ratoi=0.5"])
    with pytest.raises(ConfigError, match="DiT-XL/2"):
        load_config(None, ["model.name=DiT-XXL/2"], stage="generate")
    with pytest.raises(ConfigError, match="generate.init"):
        load_config(None, ["generate.init=pretrained"], stage="generate")


def test_unknown_group_and_bad_types_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match="'train.epochs'"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="'data.flip'"):
        load_config(None, ["data.flip=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch"):
        load_config(None, ["train.global_batch=10", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match="unknown key 'probe'"):  # a key of another stage
        load_config(None, ["probe.pool=avg"], stage="pretrain")


def test_overrides_apply_and_floats_parse():
    cfg = load_config(None, ["train.max_steps=7", "optim.blr=1", "model.decoder_depth=2", "optim.lr=2e-3"])
    assert cfg.train.max_steps == 7 and cfg.optim.blr == 1.0 and isinstance(cfg.optim.blr, float)
    assert cfg.model.decoder_depth == 2 and cfg.optim.lr == 2e-3


@pytest.mark.parametrize("name,model", [("vit_b", "usp_vit_b"), ("vit_l", "usp_vit_l"), ("vit_xl", "usp_vit_xl")])
def test_paper_configs_carry_the_recipe(name, model):
    cfg = load_config(CONFIGS / "pretrain" / f"{name}.yaml")
    assert cfg.model.name == model and cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix
    assert tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.blr == 1.5e-4
    assert cfg.optim.warmup_epochs == 40 and cfg.optim.schedule == "cosine"
    assert cfg.train.global_batch == 4096 and cfg.train.epochs in (800, 1600)
    assert cfg.data.resolution == 224 and cfg.vae.scale == 0.18215 and cfg.data.flip


def test_every_shipped_config_loads_for_its_stage_and_comments_each_key():
    found = 0
    for stage_dir in sorted(p for p in CONFIGS.iterdir() if p.is_dir() and p.name in STAGES):
        for f in sorted(stage_dir.glob("*.yaml")):
            load_config(f, stage=stage_dir.name)
            found += 1
            for line in f.read_text().splitlines():
                if ":" in line and not line.strip().startswith("#") and not line.rstrip().endswith(":"):
                    assert "#" in line, f"{f.name}: key without a one-line reason: {line!r}"
    assert found >= 15


def test_show_round_trips_and_keys_cover_every_field(tmp_path):
    cfg = load_config(CONFIGS / "generate" / "dit_xl2.yaml", ["sample.steps=50"], stage="generate")
    shown = tmp_path / "shown.yaml"
    shown.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(shown, stage="generate") == cfg
    keys = {k for k, *_ in describe_keys("generate")}
    assert {"sample.steps", "ema.decay", "generate.init", "train.nonfinite", "optim.warmup_steps"} <= keys
    assert all(doc for *_, doc in describe_keys("pretrain"))


def test_the_key_table_in_docs_is_generated_from_the_schema():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert keys_markdown() in doc, "docs/configuration.md's key table is stale: paste `usp-fast config keys --markdown`"


@pytest.mark.parametrize("override, key", [("train.max_steps=-5", "train.max_steps"), ("train.epochs=0", "train.epochs"),
                                           ("train.run_steps=0", "train.run_steps"), ("sample.batch=0", "sample.batch"),
                                           ("sample.num_images=0", "sample.num_images"),
                                           ("sample.steps=0", "sample.steps")])
def test_lengths_that_would_do_nothing_are_one_line_errors(override, key):
    """Today's faults: max_steps=-5 and epochs=0 exited 0 having trained nothing; sample.batch=0 was a
    ZeroDivisionError traceback."""
    with pytest.raises(ConfigError, match=rf"override '{override}'.*must be positive") as e:
        load_config(None, [override], stage="generate")
    assert "\n" not in str(e.value) and key.split(".")[1] in str(e.value)
