"""The run directory's artifacts: checkpoints read through DeepSpeed's public API for every ZeRO stage, exports
that load in one line."""
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from usp_fast.artifacts import (ExportError, complete_checkpoints, load_encoder, read_checkpoint, run_dir,
                                save_encoder, verify_checkpoint)
from usp_fast.engine import Trainer
from usp_fast.models.usp_vit import USPViT, build_model
from usp_fast.stages.pretrain import PretrainStage


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_read_checkpoint_gives_the_trained_weights_for_every_zero_stage(tmp_path, built_cache, tiny_vae_dir, zero):
    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={built_cache.data.cache_dir}",
                   "train.max_steps=3", f"train.zero_stage={zero}", f"run.name=z{zero}")
    result = Trainer(cfg, PretrainStage(cfg)).train()
    (ckpt,) = [p for _, p in complete_checkpoints(run_dir(cfg.run) / "checkpoints")]
    verify_checkpoint(ckpt)
    state, client = read_checkpoint(ckpt)
    assert client["step"] == 3
    exported, _ = load_encoder(result["export"])  # written from the gathered module at the end
    for k, v in exported.items():
        assert torch.equal(state[k], v), (zero, k)
    from usp_fast.restoration import load_pretrain_model  # restoration reads any ZeRO stage's checkpoint

    model, _, _ = load_pretrain_model(run_dir(cfg.run), device="cpu")
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_encoder_from_pretrained_round_trips(tmp_path):
    torch.manual_seed(0)
    vit = build_model("usp_vit_test", in_chans=4, input_size=8)
    with torch.no_grad():
        vit.blocks[0].norm1.weight.uniform_(0.5, 1.5)
    out = vit.save_pretrained(tmp_path / "export", "usp_vit_test", resolution=64, step=7)
    again, meta = USPViT.from_pretrained(out)
    assert meta["step"] == 7 and meta["model"] == "usp_vit_test"
    for k, v in vit.encoder_state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(vit.eval().forward_encoder(x), again.forward_encoder(x))


def test_exports_name_what_is_wrong(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    vit = build_model("usp_vit_test", in_chans=4, input_size=8)
    d = save_encoder(vit, tmp_path / "e", "usp_vit_test")
    (Path(d) / "encoder.safetensors").unlink()
    with pytest.raises(ExportError, match="encoder.safetensors is missing"):
        load_encoder(d)
