"""The stages, one module each, under one contract (`base.Stage`), each naming its config schema (`Stage.config`).
STAGES is the one registry: the command line's `--stage` choices, the config key table and `run_stage` all read
it. Loaded lazily: only the named stage's module (and what it imports) is loaded."""
import importlib

STAGES = {
    "cache": "usp_fast.stages.cache:CacheStage",
    "pretrain": "usp_fast.stages.pretrain:PretrainStage",
    "generate": "usp_fast.stages.generate:GenerateStage",
    "finetune": "usp_fast.stages.finetune:FinetuneStage",
    "probe": "usp_fast.stages.probe:ProbeStage",
    "segment": "usp_fast.stages.segment:SegmentStage",
}


def stage_class(name):
    if name not in STAGES:
        from ..errors import ConfigError
        raise ConfigError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_config(path=None, overrides=(), stage="pretrain"):
    """A YAML file (or a dict of groups; optional) and 'a.b=value' overrides -> stage `stage`'s validated config
    (its schema is `Stage.config`). Raises ConfigError naming the file or override, the key and what was expected."""
    from ..config import parse_config

    return parse_config(stage_class(stage).config, path, overrides)


def describe_keys(stage):
    """-> [(dotted key, type, default, doc)] for every key of a stage's config."""
    from ..config import schema_keys

    return schema_keys(stage_class(stage).config)


def keys_markdown():
    """The key table of docs/configuration.md, over every registered stage."""
    from ..config import keys_markdown as table

    return table({name: stage_class(name).config for name in STAGES})


def run_stage(name, config, overrides=(), resume=None, log_to_run=False, overwrite=False, allow_config_change=False):
    """Run stage `name`, the one way a stage is started (the command line's `usp-fast train` calls it too):
    `config` is a YAML path, a dict of groups or a validated config; `overrides` are 'a.b=value' strings;
    `resume` is None, 'auto' or a checkpoint folder; `log_to_run` sends the log to <run>/train.log as well;
    `overwrite` and `allow_config_change` are the command line's flags (usp_fast.run_folder: what they permit).
    The inputs are checked before any process group, VAE, model or data is touched. -> the stage's result."""
    from .. import dist
    from ..artifacts import run_dir
    from ..config import Config

    cfg = config if isinstance(config, Config) and not overrides else load_config(
        config.model_dump(mode="json") if isinstance(config, Config) else config, overrides, stage=name)
    stage = stage_class(name)(cfg)
    stage.check_inputs()
    if log_to_run:
        dist.setup_logging(dist.env_rank(), run_dir(cfg.run))
    dist.init()
    return stage.run(resume=resume, overwrite=overwrite, allow_config_change=allow_config_change) or {}
