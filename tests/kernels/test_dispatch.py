"""The dispatch (`backend()`, USP_FAST_KERNELS), the model through either backend, and the package without triton:
it imports and runs the PyTorch references when triton is missing, and imports triton only at a kernel's launch."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernel_checks import (CUDA, DEVICE, adaln, gen, kernels, masked_tokens, needs_triton,  # noqa: F401
                           patch_norm_mse, randn)

REPO = Path(__file__).resolve().parents[2]

OPS = ["keep_gather", "unshuffle", "patch_norm_mse", "ln_modulate", "gate_residual", "gate_residual_ln_modulate"]


@needs_triton
@pytest.mark.parametrize("choice,expected", [("triton", "triton"), ("reference", "reference"),
                                             ("auto", "cuda-dependent"), ("", "cuda-dependent")])
def test_backend_follows_env(monkeypatch, choice, expected):
    monkeypatch.setenv(kernels.ENV_VAR, choice)
    cpu, on_device = torch.zeros(1), torch.zeros(1, device=DEVICE)
    for op in OPS:
        if expected == "cuda-dependent":  # auto: Triton for CUDA tensors only
            assert kernels.backend(cpu, op) == "reference"
            assert kernels.backend(on_device, op) == ("triton" if CUDA else "reference")
        else:
            assert kernels.backend(on_device, op) == expected


def test_backend_rejects_unknown_choice(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.backend(torch.zeros(1), "keep_gather")


@pytest.mark.parametrize("choice", [pytest.param("triton", marks=needs_triton), "reference"])
def test_public_ops_call_the_chosen_implementation(monkeypatch, choice):
    monkeypatch.setenv(kernels.ENV_VAR, choice)
    modules = {"keep_gather": masked_tokens, "unshuffle": masked_tokens, "patch_norm_mse": patch_norm_mse,
               "ln_modulate": adaln, "gate_residual": adaln, "gate_residual_ln_modulate": adaln}
    for op, module in modules.items():
        monkeypatch.setattr(module, f"{op}_{choice}", lambda *a, op=op, **k: f"{op}:{choice}")
    t = torch.zeros(2, 4, 8, device=DEVICE)
    assert kernels.keep_gather(t, None) == f"keep_gather:{choice}"
    assert kernels.unshuffle(t, None, None) == f"unshuffle:{choice}"
    assert kernels.patch_norm_mse(t, None, None, 2) == f"patch_norm_mse:{choice}"
    assert kernels.ln_modulate(t, None, None) == f"ln_modulate:{choice}"
    assert kernels.gate_residual(t, None, None) == f"gate_residual:{choice}"
    assert kernels.gate_residual_ln_modulate(t, None, None, None, None) == f"gate_residual_ln_modulate:{choice}"


def model_loss_and_grads(monkeypatch, choice, latents, seed):
    from usp_fast.models.usp_vit import build_model

    monkeypatch.setenv(kernels.ENV_VAR, choice)
    torch.manual_seed(0)
    model = build_model("usp_vit_test", input_size=latents.shape[-1]).to(DEVICE)
    g = torch.Generator(device=DEVICE)
    g.manual_seed(seed)
    loss, pred, mask = model(latents, generator=g)
    loss.backward()
    return loss.detach(), mask, {n: p.grad for n, p in model.named_parameters()}


@needs_triton
@pytest.mark.parametrize("side", [8, 28])  # 16 and 196 patches
def test_usp_vit_same_loss_and_grads_with_either_backend(monkeypatch, gen, side):
    latents = randn(2, 4, side, side, gen=gen)
    ref_loss, ref_mask, ref_grads = model_loss_and_grads(monkeypatch, "reference", latents, seed=123)
    loss, mask, grads = model_loss_and_grads(monkeypatch, "triton", latents, seed=123)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and ref_grads[name] is not None, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- the package without triton, and triton imported only when a kernel launches ----

def run_python(code, tmp_path, **env):
    """`code` in a fresh interpreter started in an empty folder (so the installed package is what imports), with
    USP_FAST_KERNELS unset and `env` applied (None removes a variable)."""
    environ = {k: v for k, v in {**os.environ, kernels.ENV_VAR: None, **env}.items() if v is not None}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_imports_and_runs_the_references_without_triton(tmp_path):
    out = run_python("""
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError and find_spec finds nothing
        import importlib
        import os

        import torch

        import usp_fast_kernels as kernels
        from usp_fast_kernels import adaln

        device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU box `auto` must fall back as well
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(2, 5, 16, generator=g, device=device)
        shift, scale = torch.randn(2, 2, 16, generator=g, device=device).unbind(0)
        for op in ("keep_gather", "unshuffle", "patch_norm_mse", "ln_modulate", "gate_residual",
                   "gate_residual_ln_modulate"):
            assert kernels.backend(x, op) == "reference", op
        assert torch.equal(kernels.ln_modulate(x, shift, scale), adaln.ln_modulate_reference(x, shift, scale))
        mse = importlib.import_module("usp_fast_kernels.patch_norm_mse")
        pred, target = torch.randn(2, 16, 16, generator=g, device=device), torch.randn(2, 4, 8, 8, device=device)
        mask = (torch.rand(2, 16, generator=g, device=device) < 0.75).float()
        assert torch.equal(kernels.patch_norm_mse(pred, target, mask, 2),
                           mse.patch_norm_mse_reference(pred, target, mask, 2))

        from usp_fast.models.usp_vit import build_model  # the model trains through the references
        loss, _, _ = build_model("usp_vit_test", input_size=8).to(device)(target)
        loss.backward()
        assert torch.isfinite(loss)

        os.environ[kernels.ENV_VAR] = "triton"
        try:
            kernels.backend(x, "ln_modulate")
        except RuntimeError as e:
            assert "is triton installed" in str(e), e
        else:
            raise AssertionError("USP_FAST_KERNELS=triton without triton should raise")
        assert sys.modules["triton"] is None
        print("reference ok")
    """, tmp_path)
    assert "reference ok" in out


@needs_triton
def test_triton_is_imported_at_the_first_kernel_launch_only(tmp_path):
    out = run_python("""
        import sys

        import torch

        import usp_fast_kernels as kernels
        from usp_fast_kernels import adaln

        device = "cuda" if torch.cuda.is_available() else "cpu"
        x, shift, scale = (torch.randn(*shape, device=device) for shape in ((2, 5, 16), (2, 16), (2, 16)))
        kernels.backend(x, "ln_modulate")
        adaln.ln_modulate_reference(x, shift, scale)
        assert "triton" not in sys.modules, "importing the package or running a reference imported triton"
        y = kernels.ln_modulate(x, shift, scale)
        assert "triton" in sys.modules
        torch.testing.assert_close(y, adaln.ln_modulate_reference(x, shift, scale), rtol=1e-5, atol=1e-5)
        print("lazy ok")
    """, tmp_path, USP_FAST_KERNELS="triton", TRITON_INTERPRET=None if CUDA else "1")
    assert "lazy ok" in out


def test_nothing_imports_the_folder_name():
    # the folder is kernels/, the installed package usp_fast_kernels: `import kernels` would only resolve from the
    # repository root (or find PyPI's unrelated `kernels`)
    stale = re.compile(r"^\s*(import kernels\b|from kernels\b)", re.M)
    files = [REPO / "setup.py"]
    files += [p for d in ("usp_fast", "kernels", "benchmarks", "tests") for p in sorted((REPO / d).rglob("*.py"))]
    hits = [str(p.relative_to(REPO)) for p in files if stale.search(p.read_text(encoding="utf-8"))]
    assert not hits, f"import usp_fast_kernels instead of kernels in: {hits}"
