from pathlib import Path

import pytest

from usp_fast.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_unknown_key_names_file_and_lists_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  micro_bach: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "train.micro_bach" in msg and "micro_batch" in msg and "global_batch" in msg


def test_unknown_group_and_bad_types_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match="'train.epochs' expects int"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="expects true/false"):
        load_config(None, ["data.flip=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_apply_and_ints_promote_to_float():
    cfg = load_config(None, ["train.max_steps=7", "optim.blr=1", "model.overrides={decoder_depth: 2}"])
    assert cfg.train.max_steps == 7 and cfg.optim.blr == 1.0 and isinstance(cfg.optim.blr, float)
    assert cfg.model.overrides == {"decoder_depth": 2}


@pytest.mark.parametrize("name,model", [("vit_b", "usp_vit_b"), ("vit_l", "usp_vit_l"), ("vit_xl", "usp_vit_xl")])
def test_paper_configs_carry_the_recipe(name, model):
    cfg = load_config(CONFIGS / "pretrain" / f"{name}.yaml")
    assert cfg.model.name == model
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.05 and cfg.optim.blr == 1.5e-4
    assert cfg.optim.warmup_epochs == 40 and cfg.optim.schedule == "cosine"
    assert cfg.train.global_batch == 4096 and cfg.train.epochs in (800, 1600)
    assert cfg.data.resolution == 224 and cfg.vae.scale == 0.18215 and cfg.data.flip
    assert cfg.model.overrides.get("mask_ratio", 0.75) == 0.75


def test_every_shipped_pretrain_config_loads_and_comments_each_key():
    for f in sorted((CONFIGS / "pretrain").glob("*.yaml")):
        load_config(f)
        for line in f.read_text().splitlines():
            if ":" in line and not line.strip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"{f.name}: key without a one-line reason: {line!r}"
