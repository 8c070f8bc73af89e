"""The memory and speed knobs: train.activation_checkpointing, train.compile (the fused ops as custom ops: no graph
break), train.deepspeed_config (merged over the generated config, contradictions refused)."""
import json

import pytest
import torch

import usp_fast_kernels as kernels
from usp_fast.engine import deepspeed_config
from usp_fast.errors import ConfigError
from safetensors.torch import load_file

from usp_fast.artifacts import read_metrics
from usp_fast.models.dit import build_model as build_dit
from usp_fast.models.usp_vit import build_model as build_vit
from usp_fast.stages import load_config, run_stage
from usp_fast_kernels import _compiled

from conftest import gen_cfg, make_cfg


def _dit():
    torch.manual_seed(0)
    return build_dit("DiT-Test/2", input_size=8, in_channels=4, num_classes=10, class_dropout_prob=0.0).double()


def _dit_batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 1000, (3,), generator=g),
            torch.randint(0, 10, (3,), generator=g))


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b, tol=1e-10):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol, msg=n)


# ---- activation checkpointing: the same loss and every gradient, fewer saved activations ----
def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("family", ["dit", "vit", "classifier", "segmenter"])
def test_activation_checkpointing_keeps_loss_and_every_gradient_and_saves_fewer_activations(family):
    if family == "dit":
        model, (x, t, y) = _dit(), _dit_batch()
        step = lambda: model(x, t, y).square().mean()  # noqa: E731
    elif family == "classifier":  # timm's ViT, switched by the same set_grad_checkpointing
        from usp_fast.models.classifier import Classifier, ClassifierConfig

        torch.manual_seed(0)
        model = Classifier(ClassifierConfig(embed_dim=32, depth=2, num_heads=2, num_classes=5, latent_size=8,
                                            patch_size=2, in_chans=4, mlp_ratio=4.0, norm_eps=1e-6)).double()
        x = _dit_batch()[0]
        step = lambda: model(x).square().mean()  # noqa: E731
    elif family == "segmenter":  # timm's ViT under the neck and heads; eval: no dropout draws, BN statistics fixed
        from usp_fast.models.segmenter import Segmenter, SegmenterConfig

        torch.manual_seed(0)
        model = Segmenter(SegmenterConfig(embed_dim=32, depth=4, num_heads=2, num_classes=5, latent_size=8,
                                          head_channels=16, aux_channels=8)).double().eval()
        x = _dit_batch()[0]
        step = lambda: sum(o.square().mean() for o in model(x))  # noqa: E731
    else:
        torch.manual_seed(0)
        model = build_vit("usp_vit_test", in_chans=4, input_size=8).double()
        x = _dit_batch()[0]
        masking = model.random_masking(3, x.device, torch.Generator().manual_seed(2))
        step = lambda: model(x, masking=masking)[0]  # noqa: E731
    plain, plain_bytes = _saved_bytes(step)
    plain_grads = _grads(model, plain)
    model.set_grad_checkpointing(True)
    ckpt, ckpt_bytes = _saved_bytes(step)
    ckpt_grads = _grads(model, ckpt)
    assert ckpt.item() == plain.item()
    _assert_same_grads(plain_grads, ckpt_grads)
    # the segmenter recomputes its encoder blocks only: its neck and heads at full resolution keep their own
    most = 0.9 if family == "segmenter" else 0.5
    assert ckpt_bytes < most * plain_bytes, (ckpt_bytes, plain_bytes)


# ---- torch.compile: no graph break, custom ops whose autograd is right ----
@pytest.mark.parametrize("kernel_path", ["reference", "triton"])
def test_a_training_forward_traces_as_one_graph(monkeypatch, kernel_path):
    """Dynamo sees DiT's and the USP ViT's training forward (fused ops included) as one graph: no graph break, on
    the reference path and on the Triton path (interpreted on CPU), where each fused op is one custom-op node."""
    if kernel_path == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(kernels.ENV_VAR, kernel_path)
    torch._dynamo.reset()
    model, (x, t, y) = _dit(), _dit_batch()
    vit = build_vit("usp_vit_test", in_chans=4, input_size=8)
    masking = vit.random_masking(3, x.device, torch.Generator().manual_seed(2))
    for fn, args in ((lambda x, t, y: model(x, t, y).square().mean(), (x, t, y)),
                     (lambda x, m: vit(x, masking=m)[0], (x.float(), masking))):
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
        custom = {o for o in ops if "usp_fast" in o}
        assert bool(custom) == (kernel_path == "triton"), custom


def test_compiled_step_on_the_custom_ops_matches_eager_in_loss_and_every_gradient(monkeypatch):
    """The Triton path under torch.compile (aot_eager: the custom ops' fake and autograd registrations, no C++
    build) gives eager's loss and gradients: fused_vjp's backward is the kernels' own."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    torch._dynamo.reset()
    torch.manual_seed(0)  # 4x4 latents, 4 tokens: the interpreter runs each kernel program in Python
    model = build_dit("DiT-Test/2", input_size=4, in_channels=4, num_classes=10, class_dropout_prob=0.0)
    x, t, y = _dit_batch()
    x = x[:2, :, :4, :4].float().contiguous()
    t, y = t[:2], y[:2]
    eager = model(x, t, y).square().mean()
    eager_grads = _grads(model, eager)
    compiled_fn = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled_fn(x, t, y).square().mean()
    _assert_same_grads(eager_grads, _grads(model, out), tol=1e-5)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)


def test_every_custom_op_passes_torch_library_opcheck():
    """Schema, fake (shape) function, autograd registration and AOT dispatch of each op, with Optional tensors
    present and absent (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    B, T, D = 2, 4, 8
    ids_keep = torch.stack([torch.randperm(T, generator=g)[:2] for _ in range(B)])
    ids_restore = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])
    mask = torch.zeros(B, 4, dtype=torch.float64)
    mask[:, :2] = 1
    cases = [
        (_compiled.gate_residual_ln_modulate, (r(B, T, D), r(B, D), r(B, T, D), r(B, D), r(B, D), r(D), r(D), 1e-6)),
        (_compiled.gate_residual_ln_modulate, (r(B, T, D), r(B, D), r(B, T, D), r(B, D), r(B, D), None, None, 1e-6)),
        (_compiled.ln_modulate, (r(B, T, D), r(B, D), r(B, D), r(D), None, 1e-5)),
        (_compiled.gate_residual, (r(B, T, D), r(B, D), r(B, T, D))),
        (_compiled.keep_gather, (r(B, T, D), ids_keep, r(T, D))),
        (_compiled.unshuffle, (r(B, 3, D), r(D), ids_restore, r(1 + T, D), 1)),
        (_compiled.patch_norm_mse_op, (r(B, 4, 12), r(B, 3, 4, 4, grad=False), mask, 2, True, 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- the knobs through the Trainer ----
def test_a_compiled_and_checkpointed_generate_run_trains_as_the_plain_one(tmp_path, built_cache):
    """train.compile (aot_eager) with train.activation_checkpointing: the same losses as a plain run, and the
    exports' parameter names unchanged."""
    runs = {}
    for name, extra in (("plain", ()), ("knobs", ("train.compile=true", "train.compile_backend=aot_eager",
                                                   "train.activation_checkpointing=true"))):
        torch._dynamo.reset()
        cfg = gen_cfg(tmp_path / name, built_cache, "train.max_steps=3", *extra)
        run_stage("generate", cfg)
        rdir = tmp_path / name / "runs" / "g"
        runs[name] = ([r["loss"] for r in read_metrics(rdir)], load_file(str(rdir / "generator" / "model.safetensors")))
    (plain, plain_w), (knobs, knobs_w) = runs["plain"], runs["knobs"]
    assert len(plain) == 3
    torch.testing.assert_close(torch.tensor(knobs), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    assert knobs_w.keys() == plain_w.keys()
    for k in plain_w:
        torch.testing.assert_close(knobs_w[k], plain_w[k], rtol=1e-4, atol=1e-5, msg=k)


def test_deepspeed_config_is_merged_over_the_generated_one(tmp_path, built_cache, tiny_vae_dir):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "stage": 0}, "wall_clock_breakdown": True}))
    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"train.deepspeed_config={extra}")
    assert cfg.train.deepspeed_config["zero_optimization"]["overlap_comm"] is True  # read at load
    ds = deepspeed_config(cfg, 1, torch.float32)
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    assert ds["wall_clock_breakdown"] is True and ds["train_batch_size"] == 8


@pytest.mark.parametrize("override, names", [
    ("train.deepspeed_config.zero_optimization.stage=2", "train.zero_stage"),
    ("train.deepspeed_config.train_batch_size=16", "train.global_batch"),
    ("train.deepspeed_config.gradient_clipping=5.0", "optim.grad_clip"),
    ("train.deepspeed_config.optimizer.type=Adam", "the stage builds the optimizer"),
    ("train.deepspeed_config.fp16.enabled=true", "train.precision=bf16"),
])
def test_a_deepspeed_config_that_contradicts_the_run_is_one_line_naming_the_key(tmp_path, built_cache, tiny_vae_dir,
                                                                                  override, names):
    cfg = make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, override)
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg, 1, torch.float32)
    msg = str(e.value)
    assert "\n" not in msg and names in msg and override.split("=")[0].split(".", 2)[2].split(".")[0] in msg


def test_a_missing_deepspeed_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"train.deepspeed_config.*nope.json"):
        load_config(None, [f"train.deepspeed_config={tmp_path / 'nope.json'}"])
