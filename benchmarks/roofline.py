"""The bytes-moved (roofline) model of the fused ops, and the speed-up bounds it allows.

Per op and implementation, the HBM bytes each kernel launch reads and writes, forward and backward, as functions of
the shape and dtypes:
  fused       the minimum a fused kernel must move: its inputs once, its outputs once, and in the backward the
              tensors the forward saved, the incoming gradients and the gradients it produces (a gradient passed
              through unchanged, gate_residual's d(x) = d(x1), moves nothing). Gathers read only the rows they
              pick. Workspace the kernels add (the adaLN backward's fp32 partials, ~1% of it) is not counted.
  eager       the PyTorch reference under autograd, every intermediate materialised in its own dtype: one entry
              per aten kernel, listed in the order the reference runs them.
  mae_gather  MAE's torch.gather formulation of the masked-token ops (the kernels suite's third baseline).
Counting convention (tests/benchmarks/test_roofline.py counts the same on CPU with a dispatch mode and checks it
equals these lists): a kernel reads each tensor argument once and writes each output once; a broadcast (stride-0)
dimension is read once; a gather's source counts the bytes it picks (at most the whole source); views move
nothing; a factory (zeros, arange) only writes.

From bytes to bounds, per device (datasheet HBM bandwidth and bf16 peak, benchmarks/env.py):
  op:   a fused op at bandwidth fraction f takes fused_bytes / (f * BW). Against a baseline that runs at the same
        fraction, its speed-up is at most baseline_bytes / fused_bytes: no ratio target of the kernels suite may
        exceed that. An op whose minimal bytes take less than its launches' fixed cost (LAUNCH_US each, an
        estimate) is launch-bound: a bandwidth-fraction target means nothing there, and its ratio bound is the
        ratio of launches instead.
  step: a step's matmuls take at least train FLOPs / peak (benchmarks/flops.py), and the fused ops save at most
        (eager - fused bytes) / BW of it (the reference's element-wise kernels at full bandwidth). So the step
        speed-up over the reference is at most 1 + saved / matmul time at peak (the bound when the reference
        step is exactly matmuls + the ops' extra bytes); with a measured reference step time t it is
        t / (t - saved). Differences the model does not cover (attention backend, launch overhead) are not in it.
"""
from dataclasses import dataclass

from usp_fast_benchmarks.env import DATASHEET_BF16_TFLOPS, DATASHEET_HBM_TBPS
from usp_fast_benchmarks.flops import dit as dit_flops, usp_vit as usp_vit_flops

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1}
# Fixed cost of one kernel launch back to back on a stream (an estimate, not measured here): what decides whether
# an op is launch-bound.
LAUNCH_US = 4.0
ADALN_OPS = ("ln_modulate", "gate_residual", "gate_residual_ln_modulate")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its name and the bytes it reads and writes."""
    name: str
    read: int
    write: int


@dataclass(frozen=True)
class Traffic:
    """The launches of one op's forward and backward."""
    fwd: tuple
    bwd: tuple

    def bytes(self, direction="fwd_bwd"):
        launches = {"fwd": self.fwd, "bwd": self.bwd, "fwd_bwd": self.fwd + self.bwd}[direction]
        return sum(k.read + k.write for k in launches)

    @property
    def launches(self):
        return len(self.fwd) + len(self.bwd)


def _k(name, reads, writes):
    return Launch(name, sum(reads), sum(writes))


# ---- adaLN: ln_modulate, gate_residual, gate_residual_ln_modulate ([B, T, D]; vectors [B, D]; weight [D]) ----

def _adaln_sizes(B, T, D, dtype, stats_dtype):
    e = ITEMSIZE[dtype]
    return B * T * D * e, B * D * e, D * e, B * T * ITEMSIZE[stats_dtype]


def _adaln_fused(op, B, T, D, dtype, affine):
    act, vec, w, _ = _adaln_sizes(B, T, D, dtype, dtype)
    wb = 2 * w if affine else 0
    if op == "ln_modulate":  # x, shift, scale (, w, b) -> out; saved x, scale (, w, b)
        return Traffic((_k("fused_fwd", [act, 2 * vec, wb], [act]),),
                       (_k("fused_bwd", [act, vec, wb, act], [act, 2 * vec, wb]),))
    if op == "gate_residual":  # x, gate, y -> x1; saved y, gate; d(x) is d(x1) itself
        return Traffic((_k("fused_fwd", [2 * act, vec], [act]),),
                       (_k("fused_bwd", [act, vec, act], [act, vec]),))
    # x, gate, y, shift, scale (, w, b) -> x1, out; saved x1, y, gate, scale (, w, b)
    return Traffic((_k("fused_fwd", [2 * act, 3 * vec, wb], [2 * act]),),
                   (_k("fused_bwd", [2 * act, 2 * vec, wb, 2 * act], [2 * act, 3 * vec, wb]),))


def _ln_modulate_eager(act, vec, w, st, affine):
    wb = 2 * w if affine else 0
    fwd = (_k("native_layer_norm", [act, wb], [act, 2 * st]),
           _k("add(1+scale)", [vec], [vec]),
           _k("mul", [act, vec], [act]),
           _k("add(shift)", [act, vec], [act]))
    bwd = (_k("sum(d shift)", [act], [vec]),
           _k("mul(dout*xhat)", [2 * act], [act]),
           _k("mul(dout*(1+scale))", [act, vec], [act]),
           _k("sum(d scale)", [act], [vec]),
           _k("native_layer_norm_backward", [2 * act, 2 * st, wb], [act, wb]))
    return fwd, bwd


def _gate_residual_eager(act, vec):
    fwd = (_k("mul(gate*y)", [vec, act], [act]), _k("add(x+)", [2 * act], [act]))
    bwd = (_k("mul(d y)", [act, vec], [act]), _k("mul(dx1*y)", [2 * act], [act]), _k("sum(d gate)", [act], [vec]))
    return fwd, bwd


def _adaln_eager(op, B, T, D, dtype, affine, stats_dtype):
    act, vec, w, st = _adaln_sizes(B, T, D, dtype, stats_dtype)
    if op == "ln_modulate":
        return Traffic(*_ln_modulate_eager(act, vec, w, st, affine))
    gr_fwd, gr_bwd = _gate_residual_eager(act, vec)
    if op == "gate_residual":
        return Traffic(gr_fwd, gr_bwd)
    ln_fwd, ln_bwd = _ln_modulate_eager(act, vec, w, st, affine)
    # the two gradients of x1 (the residual output's and the norm's) are added before the residual's backward
    return Traffic(gr_fwd + ln_fwd, ln_bwd + (_k("add(dx1)", [2 * act], [act]),) + gr_bwd)


# ---- masked tokens: keep_gather ([B, L, D] -> [B, K, D]) and unshuffle ([B, P+K, D] -> [B, P+L, D]) ----

def _keep_gather(impl, B, L, K, D, dtype, pos_dtype):
    e, pe, i8 = ITEMSIZE[dtype], ITEMSIZE[pos_dtype], 8
    x, vis, pos, ids = B * L * D * e, B * K * D * e, L * D * pe, B * K * i8
    if impl == "fused":  # picks K rows of x (+ their pos rows); backward writes all of d(x), zeros included
        return Traffic((_k("fused_fwd", [vis, pos, ids], [vis]),), (_k("fused_bwd", [vis, ids], [x]),))
    cast = pe != e
    if impl == "eager":  # x[rows, ids] + pos[ids].to(dtype)
        fwd = (_k("arange", [], [B * i8]),
               _k("index(x)", [vis, B * i8, ids], [vis]),
               _k("index(pos)", [min(pos, B * K * D * pe), ids], [B * K * D * pe]),
               *((_k("_to_copy(pos)", [B * K * D * pe], [vis]),) if cast else ()),
               _k("add", [2 * vis], [vis]))
        bwd = (_k("new_zeros", [], [x]), _k("index_put", [x, B * i8, ids, vis], [x]))
        return Traffic(fwd, bwd)
    # MAE: gather(x + pos, ids repeated over D)
    fwd = (*((_k("_to_copy(pos)", [pos], [L * D * e]),) if cast else ()),
           _k("add(x+pos)", [x, L * D * e], [x]),
           _k("repeat(ids)", [ids], [B * K * D * i8]),
           _k("gather", [vis, B * K * D * i8], [vis]))
    bwd = (_k("new_zeros", [], [x]), _k("scatter_add", [x, B * K * D * i8, vis], [x]))
    return Traffic(fwd, bwd)


def _unshuffle(impl, B, L, K, D, P, dtype, pos_dtype):
    e, pe, i8 = ITEMSIZE[dtype], ITEMSIZE[pos_dtype], 8
    y, full, out, tok = B * (P + K) * D * e, B * L * D * e, B * (P + L) * D * e, D * e
    pos, ids = (P + L) * D * pe, B * L * i8
    if impl == "fused":
        return Traffic((_k("fused_fwd", [y, tok, pos, ids], [out]),), (_k("fused_bwd", [out, ids], [y, tok]),))
    cast = pe != e
    vis, prefix = B * K * D * e, B * P * D * e
    if impl == "eager":
        place = (_k("arange", [], [B * i8]), _k("index(full)", [full, B * i8, ids], [full]))
        unplace = (_k("new_zeros", [], [full]), _k("index_put", [full, B * i8, ids, full], [full]))
    else:  # MAE: gather / scatter_add with the ids repeated over D
        place = (_k("repeat(ids)", [ids], [B * L * D * i8]), _k("gather", [full, B * L * D * i8], [full]))
        unplace = (_k("new_zeros", [], [full]), _k("scatter_add", [full, B * L * D * i8, full], [full]))
    fwd = (_k("cat(visible, mask tokens)", [vis, tok], [full]), *place,
           _k("cat(prefix, tokens)", [prefix, full], [out]),
           *((_k("_to_copy(pos)", [pos], [(P + L) * D * e]),) if cast else ()),
           _k("add(pos)", [out, (P + L) * D * e], [out]))
    bwd = (_k("slice_backward(prefix)", [prefix], [y]), *unplace,
           _k("sum(d mask token)", [B * (L - K) * D * e], [tok]),
           _k("slice_backward(visible)", [vis], [y]),
           _k("add(d y)", [2 * y], [y]))
    return Traffic(fwd, bwd)


# ---- patch_norm_mse: pred [B, L, N], target [B, C, H, W], mask [B, L] -> fp32 scalar ----

def _patch_norm_mse(impl, B, C, H, W, p, dtype, mask_dtype):
    e, me, f = ITEMSIZE[dtype], ITEMSIZE[mask_dtype], 4
    L, N = (H // p) * (W // p), p * p * C
    pred, target, mask = B * L * N * e, B * C * H * W * e, B * L * me
    if impl == "fused":  # forward writes the loss and the masked count, saved with pred, target and mask
        return Traffic((_k("fused_fwd", [pred, target, mask], [f, f]),),
                       (_k("fused_bwd", [pred, target, mask, f, f], [pred]),))
    big, row = B * L * N * f, B * L * f
    fwd = (*((_k("_to_copy(target)", [target], [big]),) if e != f else ()),
           _k("clone(patchify)", [big], [big]),
           _k("mean", [big], [row]), _k("var", [big], [row]), _k("sub(mean)", [big, row], [big]),
           _k("add(eps)", [row], [row]), _k("sqrt", [row], [row]), _k("div(std)", [big, row], [big]),
           *((_k("_to_copy(pred)", [pred], [big]),) if e != f else ()),
           _k("sub", [2 * big], [big]), _k("pow", [big], [big]), _k("mean(patch)", [big], [row]),
           *((_k("_to_copy(mask)", [mask], [row]),) if me != f else ()),
           _k("mul(mask)", [2 * row], [row]), _k("sum(loss)", [row], [f]), _k("sum(mask)", [row], [f]),
           _k("div", [2 * f], [f]))
    bwd = (_k("div", [2 * f], [f]), _k("mul(mask)", [f, row], [row]), _k("div(mean backward)", [row], [big]),
           _k("pow", [big], [big]), _k("mul(2)", [big], [big]), _k("mul", [2 * big], [big]),
           *((_k("_to_copy(d pred)", [big], [pred]),) if e != f else ()))
    return Traffic(fwd, bwd)


def traffic(op, impl, dtype="bfloat16", *, stats_dtype="float32", **shape):
    """The launches of `op` under `impl` ('fused', 'eager', or for the masked ops 'mae_gather'). shape: adaLN ops
    B, T, D, affine (LayerNorm weight and bias; default False); keep_gather B, L, K, D, pos_dtype; unshuffle
    B, L, K, D, P, pos_dtype; patch_norm_mse B, C, H, W, p, mask_dtype. stats_dtype: the dtype of the eager
    LayerNorm's saved mean and rstd (fp32 on CUDA; the input's dtype on CPU)."""
    if op in ADALN_OPS:
        s = dict(B=shape["B"], T=shape["T"], D=shape["D"], dtype=dtype, affine=shape.get("affine", False))
        if op == "gate_residual":
            s["affine"] = False  # no LayerNorm
        return _adaln_fused(op, **s) if impl == "fused" else _adaln_eager(op, **s, stats_dtype=stats_dtype)
    if op == "keep_gather":
        return _keep_gather(impl, shape["B"], shape["L"], shape["K"], shape["D"], dtype,
                            shape.get("pos_dtype", dtype))
    if op == "unshuffle":
        return _unshuffle(impl, shape["B"], shape["L"], shape["K"], shape["D"], shape.get("P", 0), dtype,
                          shape.get("pos_dtype", dtype))
    if op == "patch_norm_mse":
        return _patch_norm_mse(impl, shape["B"], shape["C"], shape["H"], shape["W"], shape["p"], dtype,
                               shape.get("mask_dtype", dtype))
    raise KeyError(f"no bytes model for op {op!r}")


# ---- per op: the bounds of the kernels suite's targets ----

def bandwidth_bytes_per_s(device):
    return DATASHEET_HBM_TBPS[device] * 1e12


def op_bounds(op, device, dtype="bfloat16", **shape):
    """{'fused_bytes', 'eager_bytes', 'roofline_us' (fused bytes at the datasheet bandwidth), 'launch_bound',
    'max_ratio': {baseline: bound}} of one op at one shape on `device` (a torch device name)."""
    fused = traffic(op, "fused", dtype, **shape)
    roofline_us = fused.bytes() / bandwidth_bytes_per_s(device) * 1e6
    launch_bound = roofline_us < fused.launches * LAUNCH_US
    baselines = {"eager": traffic(op, "eager", dtype, **shape)}
    if op in ("keep_gather", "unshuffle"):
        baselines["mae_gather"] = traffic(op, "mae_gather", dtype, **shape)
    ratio = {name: (t.launches / fused.launches if launch_bound else t.bytes() / fused.bytes())
             for name, t in baselines.items()}
    return {"fused_bytes": fused.bytes(), "eager_bytes": baselines["eager"].bytes(), "roofline_us": roofline_us,
            "launch_bound": launch_bound, "max_ratio": ratio}


# ---- per step: the fused ops a training step runs, and the speed-up bound over the reference step ----

def step_ops(stage, cfg, batch):
    """[(op, shape)] of the fused-op calls of one training step of the USP ViT (`stage` 'pretrain') or DiT/SiT
    ('generate') with config `cfg` at per-GPU `batch`, in bf16 (usp_fast/models: a DiT runs one ln_modulate and
    two gate_residual_ln_modulate per block, the last into the final layer's affine-free norm; the pretrain model
    one keep_gather, unshuffle and patch_norm_mse)."""
    if stage == "generate":
        s = dict(B=batch, T=cfg.grid_size**2, D=cfg.hidden_size, affine=cfg.norm_affine)
        final = dict(s, affine=False)
        return [("ln_modulate", s)] + [("gate_residual_ln_modulate", s)] * (2 * cfg.depth - 1) + \
            [("gate_residual_ln_modulate", final)]
    L = cfg.num_patches
    K = usp_vit_kept(cfg)
    side = cfg.input_size
    return [("keep_gather", dict(B=batch, L=L, K=K, D=cfg.embed_dim)),
            ("unshuffle", dict(B=batch, L=L, K=K, D=cfg.decoder_dim, P=1)),
            ("patch_norm_mse", dict(B=batch, C=cfg.in_chans, H=side, W=side, p=cfg.patch_size,
                                    mask_dtype="float32"))]


def usp_vit_kept(cfg):
    from usp_fast.models.usp_vit import kept_patches

    return kept_patches(cfg.num_patches, cfg.mask_ratio)


def step_bound(stage, cfg, batch, device, reference_ms=None):
    """{'saved_bytes', 'saved_ms', 'matmul_ms_at_peak', 'max_speedup_vs_reference'} of one training step on
    `device`: max speed-up 1 + saved / matmul time at the datasheet peak, or with a measured reference step
    time t, t / (t - saved)."""
    saved = sum(traffic(op, "eager", **s).bytes() - traffic(op, "fused", **s).bytes()
                for op, s in step_ops(stage, cfg, batch))
    saved_ms = saved / bandwidth_bytes_per_s(device) * 1e3
    train_flops = (usp_vit_flops if stage == "pretrain" else dit_flops)(cfg).train * batch
    matmul_ms = train_flops / (DATASHEET_BF16_TFLOPS[device] * 1e12) * 1e3
    bound = (reference_ms / (reference_ms - saved_ms) if reference_ms and reference_ms > saved_ms
             else 1 + saved_ms / matmul_ms)
    return {"saved_bytes": saved, "saved_ms": saved_ms, "matmul_ms_at_peak": matmul_ms,
            "max_speedup_vs_reference": bound}


def main():
    """Print the bytes model at the paper shapes (DiT-XL/2 b256, ViT-L pretraining) and the step bounds."""
    from usp_fast.models import dit, usp_vit

    device = "NVIDIA H200"
    B, T, D = 256, 256, 1152
    print(f"{'op':<44}{'fused MB':>10}{'eager MB':>10}{'ratio':>7}{'roofline us':>13}  (bf16, {device})")
    vit_l = usp_vit.model_config("usp_vit_l")
    rows = [(f"{op} DiT-XL/2 b{B}", op, dict(B=B, T=T, D=D)) for op in ADALN_OPS]
    rows += [(f"{op} ViT-L b{B}", op, s) for op, s in step_ops("pretrain", vit_l, B)]
    for label, op, s in rows:
        b = op_bounds(op, device, **s)
        tag = " launch-bound" if b["launch_bound"] else ""
        print(f"{label:<44}{b['fused_bytes'] / 1e6:>10.0f}{b['eager_bytes'] / 1e6:>10.0f}"
              f"{b['eager_bytes'] / b['fused_bytes']:>7.2f}{b['roofline_us']:>13.1f}{tag}")
    for stage, name, batch in (("generate", "DiT-XL/2", 256), ("generate", "DiT-XL/2", 32),
                               ("pretrain", "usp_vit_l", 128), ("pretrain", "usp_vit_xl", 128)):
        cfg = (dit.model_config(name) if stage == "generate" else usp_vit.model_config(name))
        for dev in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
            sb = step_bound(stage, cfg, batch, dev)
            print(f"step {name} b{batch} on {dev}: fused ops save {sb['saved_bytes'] / 1e9:.1f} GB = "
                  f"{sb['saved_ms']:.1f} ms against >= {sb['matmul_ms_at_peak']:.0f} ms of matmuls: speed-up over "
                  f"the reference <= {sb['max_speedup_vs_reference']:.3f}")


if __name__ == "__main__":
    main()
