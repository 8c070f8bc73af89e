"""--stage generate on the shared loop: a USP-initialised tiny DiT learns, resume is exact, EMA, config checks."""
import json
from pathlib import Path

import pytest
import torch

from conftest import gen_cfg
from usp_fast.stages import load_config
from usp_fast.diffusion import create_objective
from usp_fast.errors import UserError
from usp_fast.artifacts import complete_checkpoints, save_encoder
from usp_fast.engine import Trainer
from usp_fast.ema import EMA
from usp_fast.stages.generate import GenerateStage
from usp_fast.models.usp_vit import build_model as build_vit
from usp_fast.sampling import load_generator
from usp_fast.transfer import BLOCK_PARAMS
from usp_fast.vae import LatentNorm


pytestmark = pytest.mark.usefixtures("one_thread")


def _manifest(cache_cfg):
    return json.loads((Path(cache_cfg.data.cache_dir) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def usp_export(tmp_path_factory, built_cache):
    """A usp_vit_test encoder export on the cache's latent space (8x8 latents, 4x4 grid)."""
    torch.manual_seed(0)
    vit = build_vit("usp_vit_test", input_size=8)
    m = _manifest(built_cache)
    return save_encoder(vit, tmp_path_factory.mktemp("usp_export"), "usp_vit_test", m["vae"], m["resolution"], 0, 0.0)


def _rows(cfg):
    path = Path(cfg.run.out_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines()]


def test_tiny_generate_run_from_usp_init_lowers_its_loss(tmp_path, built_cache, usp_export):
    cfg = gen_cfg(tmp_path, built_cache, f"generate.init=usp:{usp_export}", "train.max_steps=40",
                  "train.log_every=5", "data.sample_posterior=false", "train.ckpt_every=20")
    result = Trainer(cfg, GenerateStage(cfg)).train()
    rows = _rows(cfg)
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert {"mse", "vb"} <= set(rows[0])  # the hybrid loss's two terms are logged
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    run_dir = Path(cfg.run.out_dir) / "g"
    transfer = json.loads((run_dir / "transfer.json").read_text())
    assert set(transfer["copied"]) >= {f"blocks.1.{p}" for p in BLOCK_PARAMS} and "pos_embed" in transfer["resized"]
    # the final generator folder and the step-40 checkpoint hold the same EMA weights
    final, meta = load_generator(result["generator"], use_ema=True)
    ckpt = complete_checkpoints(run_dir / "checkpoints")[-1][1]
    from_ckpt, _ = load_generator(ckpt, use_ema=True)
    assert meta["step"] == 40 and meta["objective"] == "ddpm" and meta["config"]["norm_affine"] is True
    assert meta["config"]["mlp_act"] == "gelu_tanh"  # the official USP DiT: tanh-GELU whatever the export used
    for (k, a), b in zip(final.state_dict().items(), from_ckpt.state_dict().values()):
        assert torch.equal(a, b), k
    raw, _ = load_generator(result["generator"], use_ema=False)
    assert not torch.equal(raw.blocks[0].attn.qkv.weight, final.blocks[0].attn.qkv.weight)


def test_generate_resume_is_exact_including_ema(tmp_path, built_cache):
    common = ["train.max_steps=6", "train.ckpt_every=2", "model.name=SiT-Test/2"]
    full = gen_cfg(tmp_path, built_cache, *common, "run.name=full")
    full_out = Trainer(full, GenerateStage(full)).train()
    part = gen_cfg(tmp_path, built_cache, *common, "run.name=part", "train.run_steps=3")
    assert Trainer(part, GenerateStage(part)).train() == {"stopped_at": 3}
    resumed = gen_cfg(tmp_path, built_cache, *common, "run.name=part")
    part_out = Trainer(resumed, GenerateStage(resumed), resume="auto").train()
    assert [r["loss"] for r in _rows(resumed)] == [r["loss"] for r in _rows(full)]  # bitwise (fp32 CPU)
    for use_ema in (True, False):
        a, _ = load_generator(full_out["generator"], use_ema)
        b, _ = load_generator(part_out["generator"], use_ema)
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), (use_ema, k)


def test_ema_update_formula_fp32_and_bf16():
    lin = torch.nn.Linear(3, 2)
    ema = EMA(lin, 0.75)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    ema.update(lin)
    for s, b, p in zip(ema.shadow, before, lin.parameters()):
        torch.testing.assert_close(s, 0.75 * b + 0.25 * p)
    lin16 = torch.nn.Linear(3, 2).bfloat16()
    ema16 = EMA(lin16, 0.5)
    with torch.no_grad():
        for p in lin16.parameters():
            p.fill_(2.0)
    start = [s.clone() for s in ema16.shadow]
    ema16.update(lin16)
    assert all(s.dtype == torch.float32 for s in ema16.shadow)
    for s, b in zip(ema16.shadow, start):
        torch.testing.assert_close(s, 0.5 * b + 1.0)


def test_generate_config_checks(tmp_path, built_cache, usp_export):
    with pytest.raises(ValueError, match="usp:<encoder export"):  # checked at load now (ConfigError)
        GenerateStage(gen_cfg(tmp_path, built_cache, "generate.init=pretrained"))
    with pytest.raises(ValueError, match="unknown key 'model.learn_sigma'"):  # generate.learn_sigma is the key
        GenerateStage(gen_cfg(tmp_path, built_cache, "model.learn_sigma=false"))
    manifest = _manifest(built_cache)
    other = json.loads(json.dumps(manifest))
    other["vae"]["fingerprint"] = "0" * 16
    task = GenerateStage(gen_cfg(tmp_path, built_cache, f"generate.init=usp:{usp_export}"))
    with pytest.raises(ValueError, match="same latent space"):
        task.build_model(other, LatentNorm())
    # SiT defaults: linear objective, C outputs; random init keeps DiT's affine-free LayerNorm and tanh-GELU
    task = GenerateStage(gen_cfg(tmp_path, built_cache, "model.name=SiT-Test/2"))
    model = task.build_model(manifest, LatentNorm())
    assert task.objective_name == "linear" and model.cfg.out_channels == 4
    assert model.blocks[0].norm1.weight is None and model.cfg.mlp_act == "gelu_tanh"
    # after_step is the EMA update (decay 0.9 in gen_cfg), and its state round-trips through the checkpoint hooks;
    # fp32 at ZeRO-0: the masters are the parameters (an engine with no optimizer partitions)
    from types import SimpleNamespace
    task.attach(SimpleNamespace(module=model, optimizer=None))
    start = {k: v.clone() for k, v in task.state_dict()["ema"].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    task.after_step(model, 0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(task.state_dict()["ema"][name], 0.9 * start[name] + 0.1 * p)
    task.load_state_dict({"ema": start})
    assert all(torch.equal(task.state_dict()["ema"][k], v) for k, v in start.items())


@pytest.fixture(scope="module")
def usp_export_real_ln(tmp_path_factory, built_cache):
    """An export whose LayerNorm affines are far from a fresh DiT's ones and zeros, so an LN transfer is visible."""
    torch.manual_seed(1)
    vit = build_vit("usp_vit_test", input_size=8)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if ".norm" in name:
                p.uniform_(0.3, 1.7) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    m = _manifest(built_cache)
    return save_encoder(vit, tmp_path_factory.mktemp("usp_export_ln"), "usp_vit_test", m["vae"], m["resolution"],
                        0, 0.0), vit


@pytest.mark.parametrize("norms", [True, False])
def test_the_engine_trains_the_transferred_weights_from_step_0(tmp_path, built_cache, usp_export_real_ln, norms):
    """Read the weights from the DeepSpeed engine itself, after it wrapped the model: a stage that re-initialised
    its model after the transfer would still report every block as copied, and this catches it."""
    export, vit = usp_export_real_ln
    cfg = gen_cfg(tmp_path, built_cache, f"generate.init=usp:{export}", f"generate.transfer_norms={norms}")
    trainer = Trainer(cfg, GenerateStage(cfg))
    live = trainer.engine.module.state_dict()
    src = vit.state_dict()
    for i in range(len(vit.blocks)):
        for p in BLOCK_PARAMS:
            key = f"blocks.{i}.{p}"
            if ".norm" in key and not norms:  # Table 8b: fresh LayerNorm affine, attention/MLP still copied
                fresh = torch.ones_like(src[key]) if key.endswith("weight") else torch.zeros_like(src[key])
                assert torch.equal(live[key], fresh), key
            else:
                assert torch.equal(live[key], src[key]), key
    assert torch.equal(live["x_embedder.proj.weight"], src["patch_embed.proj.weight"])
    report = json.loads((Path(cfg.run.out_dir) / "g" / "transfer.json").read_text())
    assert ("LayerNorm affine NOT transferred" in " ".join(report["notes"])) != norms
    assert "grid kept (no resize)" in report["resized"]["pos_embed"]


def test_unconditional_mode_trains_and_samples_the_null_class_only(tmp_path, built_cache):
    from usp_fast.sampling import sample_latents

    cfg = gen_cfg(tmp_path, built_cache, "generate.unconditional=true", "train.max_steps=2", "run.name=u")
    result = Trainer(cfg, GenerateStage(cfg)).train()
    model, meta = load_generator(result["generator"])
    assert model.cfg.num_classes == 0 and model.cfg.null_class == 0
    assert model.y_embedder.embedding_table.weight.shape[0] == 1
    scfg = load_config(None, ["sample.steps=2", "sample.method=ddim"], stage="generate").sample
    objective = create_objective(meta["objective"], model.cfg.learn_sigma)
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(a[2].clone()))
    _, labels = sample_latents(model, objective, scfg, "ddim", 0, 3, torch.device("cpu"))
    assert labels.tolist() == [0, 0, 0] and all(c.tolist() == [0, 0, 0] for c in calls)  # one pass per step
    assert len(calls) == 2
    guided = load_config(None, ["sample.cfg_scale=4"], stage="generate").sample
    with pytest.raises(UserError, match="unconditional"):
        sample_latents(model, objective, guided, "ddim", 0, 3, torch.device("cpu"))


def test_ema_warmup_follows_timms_schedule_and_resumes_exactly():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, 0.999, warmup=True)
    assert ema.decay_at(0) == 0.0 and abs(ema.decay_at(7) - (1 - 8 ** (-2 / 3))) < 1e-12
    assert ema.decay_at(10**9) == 0.999 and EMA(lin, 0.999).decay_at(0) == 0.999
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin, 0)  # decay 0: the shadow is the weights
    assert torch.equal(ema.shadow[0], lin.weight)


def test_bf16_ema_and_exports_come_from_the_fp32_masters(tmp_path, built_cache):
    """bf16 under ZeRO-1: the module holds bf16 weights, the optimizer fp32 masters. With ema.decay=0 the EMA is the
    last master, so the exported EMA equals the exported weights bit for bit, and both carry fp32 values that
    bf16 cannot represent (an export of the module's bf16 weights would round every one of them)."""
    cfg = gen_cfg(tmp_path, built_cache, "train.precision=bf16", "train.zero_stage=1", "train.max_steps=3",
                  "ema.decay=0.0", "model.name=SiT-Test/2")
    result = Trainer(cfg, GenerateStage(cfg)).train()
    raw, _ = load_generator(result["generator"], use_ema=False)
    ema, _ = load_generator(result["generator"], use_ema=True)
    weights = dict(raw.named_parameters())
    for k, v in ema.named_parameters():
        assert torch.equal(v, weights[k]), k
    w = raw.blocks[0].attn.qkv.weight
    assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())


def test_two_rank_bf16_ema_and_export_gather_the_fp32_masters(tmp_path, built_cache):
    """`deepspeed --num_gpus 2` on CPU (gloo), bf16 ZeRO-1 with accumulation: each rank holds half of the fp32
    masters, so the per-step EMA read and the export are collectives on both ranks. They must not hang, and with
    ema.decay=0 the exported EMA equals the exported fp32 master weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[2]
    c = built_cache
    args = [f"run.out_dir={tmp_path / 'runs'}", "run.name=mr", f"data.root={c.data.root}", "data.demo_images=0",
            f"data.cache_dir={c.data.cache_dir}", f"data.resolution={c.data.resolution}", "data.num_workers=0",
            f"vae.name={c.vae.name}", "vae.scale=0.18215", "vae.normalize=none", "model.name=SiT-Test/2",
            "generate.init=random", "train.precision=bf16", "train.zero_stage=1", "train.max_steps=3",
            "train.global_batch=8", "train.micro_batch=2", "train.log_every=1", "ema.decay=0.0", "ema.warmup=false",
            "sample.classes=[]"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29537",
           str(repo / "usp_fast" / "train.py"), "--stage", "generate", "--config",
           str(repo / "configs" / "generate" / "demo.yaml"), *args]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "mr" / "generator"
    weights, ema = load_file(str(out / "model.safetensors")), load_file(str(out / "ema.safetensors"))
    for k, v in ema.items():
        assert torch.equal(v, weights[k]), k
    w = weights["blocks.0.attn.qkv.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())


@pytest.mark.parametrize("precision, zero", [("bf16", 1), ("fp32", 3)])
def test_the_ema_averages_this_ranks_masters_with_no_collective_per_step(tmp_path, built_cache, monkeypatch,
                                                                         precision, zero):
    """The EMA of each rank's fp32 master partition (ZeRO-1 bf16, ZeRO-3 too): no safe_get_full_fp32_param (a
    collective each) in any step's update; with ema.decay=0 the gathered EMA is the exported fp32 weights."""
    import deepspeed.utils

    real, calls = deepspeed.utils.safe_get_full_fp32_param, []
    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param", lambda p: calls.append(1) or real(p))

    class Counting(GenerateStage):
        per_step = []

        def after_step(self, model, step):
            before = len(calls)
            super().after_step(model, step)
            self.per_step.append(len(calls) - before)

    cfg = gen_cfg(tmp_path, built_cache, f"train.precision={precision}", f"train.zero_stage={zero}",
                  "train.max_steps=3", "ema.decay=0.0", "model.name=SiT-Test/2")
    result = Trainer(cfg, Counting(cfg)).train()
    assert Counting.per_step == [0, 0, 0] and calls  # gathered at the checkpoint and the export only
    raw, _ = load_generator(result["generator"], use_ema=False)
    ema, _ = load_generator(result["generator"], use_ema=True)
    weights = dict(raw.named_parameters())
    for k, v in ema.named_parameters():
        assert torch.equal(v, weights[k]), k
