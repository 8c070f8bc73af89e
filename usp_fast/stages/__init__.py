"""The stages, one module each, under one contract (`base.Stage`). Loaded lazily: `--stage` names one, and only
its module (and what it imports) is loaded."""
import importlib

STAGES = {
    "cache": "usp_fast.stages.cache:CacheStage",
    "pretrain": "usp_fast.stages.pretrain:PretrainStage",
    "generate": "usp_fast.stages.generate:GenerateStage",
    "finetune": "usp_fast.stages.finetune:FinetuneStage",
    "probe": "usp_fast.stages.probe:ProbeStage",
}


def stage_class(name):
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)
