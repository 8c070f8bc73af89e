"""The bytes model (benchmarks/roofline.py) against counted tensor sizes on CPU, and targets.yaml against the bounds
it gives: the eager counts equal what a dispatch mode sees the references' aten kernels read and write, the fused
counts equal the Triton ops' own inputs, outputs, saved tensors and gradients, a step's fused-op calls are the
ones the models make, and no ratio target asks for more than the bytes allow."""
import fnmatch
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import usp_fast_kernels as kernels
from usp_fast_benchmarks import kernel_adaln, kernel_masked_tokens, kernel_patch_norm_mse, roofline, steps
from usp_fast_benchmarks.env import slug
from usp_fast_benchmarks.kernel_case import Inputs, dtype_name
from usp_fast_benchmarks.targets import read_targets
from usp_fast_kernels import adaln

FACTORIES = {"aten.new_zeros.default", "aten.arange.default", "aten.arange.start", "aten.zeros.default",
             "aten.full.default", "aten.new_empty_strided.default", "aten.empty.memory_format"}
NO_DATA = {"aten._unsafe_view.default", "aten.detach.default", "aten.alias.default"}
GATHERS = {"aten.index.Tensor", "aten.gather.default"}


def unique_bytes(t):
    """Bytes of a tensor as a kernel reads it from memory: a broadcast (stride-0) dimension once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else 1
    return n * t.element_size()


class CountBytes(TorchDispatchMode):
    """Every aten kernel run inside: (name, bytes read, bytes written) by the convention of roofline.py."""

    def __init__(self):
        super().__init__()
        self.launches = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if func.is_view or name in NO_DATA:
            return out
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
        reads = [unique_bytes(a) for a in ins] if name not in FACTORIES else []
        if name in GATHERS and reads:  # the source counts the rows picked
            reads[0] = min(reads[0], outs[0].numel() * ins[0].element_size())
        self.launches.append((name, sum(reads), sum(unique_bytes(o) for o in outs)))
        return out


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def counted(fn, leaves):
    """(fwd bytes, bwd bytes, launches) of fn() and its backward to `leaves` (autograd.grad: no accumulation into
    .grad, which a model's op never does either)."""
    with CountBytes() as fwd:
        outs = _as_tuple(fn())
    grads = [torch.randn_like(o) for o in outs]
    with CountBytes() as bwd:
        torch.autograd.grad(outs, leaves, grads)
    total = lambda c: sum(r + w for _, r, w in c.launches)  # noqa: E731
    return total(fwd), total(bwd), len(fwd.launches) + len(bwd.launches)


def tiny_cases(dtype):
    ctx = SimpleNamespace(tiny=True, on_gpu=False, device=torch.device("cpu"))
    inp = Inputs(ctx, dtype)
    cases = [c for m in (kernel_masked_tokens, kernel_patch_norm_mse, kernel_adaln) for c in m.cases(ctx, inp)]
    # the USP-initialised DiT's LayerNorm affine, which the suite's DiT shapes do not have
    B, T, D = 2, 8, 64
    x, y = inp.randn(B, T, D, grad=True), inp.randn(B, T, D, grad=True)
    gate, shift, scale, w, b = (inp.randn(*s, grad=True) for s in ((B, D), (B, D), (B, D), (D,), (D,)))
    affine = dict(B=B, T=T, D=D, affine=True)
    cases += [
        SimpleNamespace(op="ln_modulate", shape=affine, leaves=[x, shift, scale, w, b], impls={
            "eager": lambda: adaln.ln_modulate_reference(x, shift, scale, w, b),
            "triton": lambda: adaln.ln_modulate_triton(x, shift, scale, w, b)}),
        SimpleNamespace(op="gate_residual_ln_modulate", shape=affine, leaves=[x, gate, y, shift, scale, w, b], impls={
            "eager": lambda: adaln.gate_residual_ln_modulate_reference(x, gate, y, shift, scale, w, b),
            "triton": lambda: adaln.gate_residual_ln_modulate_triton(x, gate, y, shift, scale, w, b)}),
    ]
    return cases


def _pos_dtype(case):
    return {"pos_dtype": "float32"} if case.op in ("keep_gather", "unshuffle") else {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_and_mae_counts_equal_the_counted_aten_kernels(dtype):
    """Bytes and launches of every reference (and MAE's gathers), forward and backward, exactly."""
    for case in tiny_cases(dtype):
        for impl in ("eager", "mae_gather"):
            if impl not in case.impls:
                continue
            fwd, bwd, launches = counted(case.impls[impl], case.leaves)
            # CPU's LayerNorm saves mean and rstd in the input's dtype (CUDA's in fp32)
            model = roofline.traffic(case.op, impl, dtype_name(dtype), stats_dtype=dtype_name(dtype),
                                     **_pos_dtype(case), **case.shape)
            assert (model.bytes("fwd"), model.bytes("bwd"), model.launches) == (fwd, bwd, launches), \
                (case.op, impl, case.shape)


class Saved:
    """saved_tensors_hooks recording the bytes of each tensor an autograd.Function saves."""

    def __init__(self):
        self.bytes = 0

    def __enter__(self):
        def pack(t):
            self.bytes += unique_bytes(t)
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def test_fused_counts_equal_the_triton_ops_inputs_outputs_and_saved_tensors(monkeypatch):
    """fused fwd = inputs + outputs; bwd = saved tensors + incoming grads + produced grads (a gradient that is an
    incoming one, passed through, moves nothing). keep_gather reads only the kept rows of x."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for case in tiny_cases(torch.float32):
        fn, leaves = case.impls["triton"], case.leaves
        inputs = [t for t in _fn_inputs(case) if t is not None]
        with Saved() as saved:
            outs = _as_tuple(fn())
        grads_out = [torch.randn_like(o) for o in outs]
        grads_in = torch.autograd.grad(outs, leaves, grads_out)
        passed = {g.data_ptr() for g in grads_out}
        read_in = sum(unique_bytes(t) for t in inputs)
        if case.op == "keep_gather":
            x = inputs[0]
            read_in -= unique_bytes(x) - outs[0].numel() * x.element_size()
        fwd = read_in + sum(unique_bytes(o) for o in outs)
        bwd = (saved.bytes + sum(unique_bytes(g) for g in grads_out)
               + sum(unique_bytes(g) for g in grads_in if g.data_ptr() not in passed))
        if case.op == "patch_norm_mse":
            fwd += 4  # the masked-patch count, saved for the backward (counted there too), written by the forward
        model = roofline.traffic(case.op, "fused", "float32", **_pos_dtype(case), **case.shape)
        assert (model.bytes("fwd"), model.bytes("bwd")) == (fwd, bwd), (case.op, case.shape)


def _fn_inputs(case):
    """The tensors the case's Triton call takes, read back from its closure."""
    cells = case.impls["triton"].__code__.co_freevars, case.impls["triton"].__closure__
    values = dict(zip(cells[0], (c.cell_contents for c in cells[1])))
    order = {"keep_gather": ("x", "ids", "pos"), "unshuffle": ("y", "mask_token", "ids_restore", "pos"),
             "patch_norm_mse": ("pred", "target", "mask"), "ln_modulate": ("x", "shift", "scale", "w", "b"),
             "gate_residual": ("x", "gate", "y"),
             "gate_residual_ln_modulate": ("x", "gate", "y", "shift", "scale", "w", "b")}[case.op]
    return [values[n] for n in order if n in values]


def test_step_ops_are_the_fused_calls_the_models_make(monkeypatch):
    """One training step of the tiny steps cases calls exactly roofline.step_ops's ops at its shapes."""
    monkeypatch.setenv("USP_FAST_KERNELS", "reference")
    for case in steps.tiny_cases() + [steps.Case("generate", "DiT-Test/2", 2, (("input_size", 8), ("num_classes", 10))
                                                 + steps.USP_INIT, tag="usp-init")]:
        calls = []
        for op in roofline.ADALN_OPS + ("keep_gather", "unshuffle", "patch_norm_mse"):
            original = getattr(kernels, op)
            monkeypatch.setattr(kernels, op, lambda *a, _op=op, _f=original, **k: calls.append((_op, a)) or _f(*a, **k))
        step = steps.TrainStep(case, torch.device("cpu"), torch.float32, compile_model=False)
        step.loss()
        monkeypatch.undo()
        monkeypatch.setenv("USP_FAST_KERNELS", "reference")
        want = roofline.step_ops(case.stage, case.config(), case.batch)
        assert [op for op, _ in calls] == [op for op, _ in want], case.name
        for (op, args), (_, shape) in zip(calls, want):
            if op in roofline.ADALN_OPS:
                assert tuple(args[0].shape) == (shape["B"], shape["T"], shape["D"]), op
                assert (args[5] is not None if op == "gate_residual_ln_modulate" else args[3] is not None) \
                    == shape["affine"], (case.name, op)
            elif op == "keep_gather":
                assert (tuple(args[0].shape), args[1].shape[1]) == ((shape["B"], shape["L"], shape["D"]), shape["K"])
            elif op == "unshuffle":
                assert tuple(args[0].shape) == (shape["B"], shape["P"] + shape["K"], shape["D"])
            else:
                assert tuple(args[1].shape) == (shape["B"], shape["C"], shape["H"], shape["W"])


def test_the_bytes_model_gives_the_issues_figures_at_dit_xl2_b256():
    """gate+residual+LN+modulate 1.51 GB fused vs 4.53 GB eager fwd+bwd (3.0x), LN+modulate 3.2x, gate+residual
    1.8x, and ~35 ms saved per DiT-XL/2 b256 step on an H200 (4.8 TB/s)."""
    s = dict(B=256, T=256, D=1152)
    ratio = {op: roofline.traffic(op, "eager", **s).bytes() / roofline.traffic(op, "fused", **s).bytes()
             for op in roofline.ADALN_OPS}
    assert roofline.traffic("gate_residual_ln_modulate", "fused", **s).bytes() == pytest.approx(1.51e9, rel=0.01)
    assert roofline.traffic("gate_residual_ln_modulate", "eager", **s).bytes() == pytest.approx(4.53e9, rel=0.01)
    assert [round(ratio[op], 1) for op in roofline.ADALN_OPS] == [3.2, 1.8, 3.0]
    from usp_fast.models import dit

    bound = roofline.step_bound("generate", dit.model_config("DiT-XL/2"), 256, "NVIDIA H200")
    assert bound["saved_ms"] == pytest.approx(35, abs=1.5)


SUITE_SHAPES = {"ln_modulate": kernel_adaln.SHAPE, "gate_residual": kernel_adaln.SHAPE,
                "gate_residual_ln_modulate": kernel_adaln.SHAPE, "keep_gather": kernel_masked_tokens.KEEP_GATHER,
                "unshuffle": kernel_masked_tokens.UNSHUFFLE, "patch_norm_mse": kernel_patch_norm_mse.SHAPE}
BASELINE = {"vs_eager": "eager", "vs_adv_index": "eager", "vs_compile": "eager", "vs_mae_gather": "mae_gather"}


def _gpu_devices(targets):
    """The datasheet devices targets.yaml has targets for."""
    return [name for name in roofline.DATASHEET_HBM_TBPS if targets.get(slug(name))]


def test_no_kernel_ratio_target_exceeds_its_bytes_bound_and_bandwidth_targets_are_roofline_fractions():
    """vs_<baseline> <= baseline bytes / fused bytes (launches for a launch-bound op; torch.compile moves at least
    the fused bytes and at most the eager ones) on every GPU with targets; hbm_bw_fraction >= 0.7 and only where
    the op is bandwidth-bound."""
    targets = read_targets()
    devices = _gpu_devices(targets)
    assert devices
    for op, wanted in targets["_kernels"]["speed"].items():
        for device in devices:
            b = roofline.op_bounds(op, device, pos_dtype="float32", **SUITE_SHAPES[op])
            for target, value in wanted.items():
                if target == "hbm_bw_fraction":
                    assert value >= 0.7 and not b["launch_bound"], (op, device)
                else:
                    assert value <= b["max_ratio"][BASELINE[target]], (op, target, device, b)
        assert "hbm_bw_fraction" in wanted or roofline.op_bounds(op, devices[0], pos_dtype="float32",
                                                                 **SUITE_SHAPES[op])["launch_bound"], op


def test_no_step_ratio_target_exceeds_the_bound_of_the_bytes_saved():
    """Every steps speedup_vs_reference target, on every case its row glob matches, <= 1 + saved / matmul time at
    the datasheet peak; DiT-XL/2 b256 has its MFU floor of 0.45."""
    targets = read_targets()
    cases = {c.name: c for c in steps.paper_cases()}
    checked = 0
    for device in _gpu_devices(targets):
        items = targets[slug(device)]["steps"]
        for t in items:
            if not t["metric"].startswith("speedup_vs_reference") or "min" not in t:
                continue
            matched = [cases[k.rsplit("/", 1)[0]] for k in fnmatch.filter([f"{n}/usp-fast" for n in cases], t["row"])]
            assert matched, t
            for case in matched:
                bound = roofline.step_bound(case.stage, case.config(), case.batch, device)
                assert t["min"] <= bound["max_speedup_vs_reference"], (device, case.name, t, bound)
                checked += 1
        floors = {t["row"]: t["min"] for t in items if t["metric"] == "mfu"}
        assert floors.get("generate/DiT-XL/2/b256/usp-fast", 0) >= 0.45
    assert checked
