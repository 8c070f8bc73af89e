"""One attention backend picker, in order of preference for a CUDA tensor in fp16/bf16:
  fa3   FlashAttention-3 (`flash_attn_interface`, Hopper sm_90 only; built from the flash-attention repo's hopper/)
  fa2   FlashAttention-2 (`flash_attn`, the optional extra `usp-fast[flash]`)
  sdpa  torch's scaled_dot_product_attention (itself picking flash / cuDNN / memory-efficient / math kernels)
fp32 and CPU tensors always take sdpa. A backend that raises at run time (e.g. a head size its build lacks) is
logged once and skipped from then on. The backend a call used is logged once per (backend, device, dtype) and
kept in `last_backend`, which the step benchmarks record in every row."""
import contextlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # FlashAttention-3: no wheel on PyPI; needs Hopper
    from flash_attn_interface import flash_attn_func as _fa3
except Exception:  # noqa: BLE001 - any import failure means "not usable here"
    _fa3 = None
try:  # FlashAttention-2: optional extra `usp-fast[flash]`; needs CUDA to build
    from flash_attn import flash_attn_func as _fa2
except Exception:  # noqa: BLE001
    _fa2 = None

BACKENDS = ("fa3", "fa2", "sdpa")
_skipped = set()   # backends that failed at run time, or that `only` switched off
_logged = set()
last_backend = None


def available():
    """The backends importable here, in order of preference."""
    return [name for name, fn in (("fa3", _fa3), ("fa2", _fa2), ("sdpa", F.scaled_dot_product_attention)) if fn]


def backend_name(q):
    """The backend a call with query `q` [B, H, N, d] would use."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _fa3 is not None and "fa3" not in _skipped and torch.cuda.get_device_capability(q.device)[0] == 9:
            return "fa3"
        if _fa2 is not None and "fa2" not in _skipped:
            return "fa2"
    return "sdpa"


@contextlib.contextmanager
def only(*names):
    """Inside, only the named backends are used (sdpa is always allowed): e.g. `only("sdpa")` for a reference."""
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise ValueError(f"attention backends {sorted(unknown)}: expected some of {BACKENDS}")
    saved = set(_skipped)
    _skipped.update(set(BACKENDS) - set(names) - {"sdpa"})
    try:
        yield
    finally:
        _skipped.clear()
        _skipped.update(saved)


def _flash(fn, q, k, v):
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # flash layout: [B, N, H, d]
    out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp
    return out.transpose(1, 2)


def attention(q, k, v):
    """q, k, v [B, H, N, d] -> [B, H, N, d]."""
    global last_backend
    name = backend_name(q)
    if name != "sdpa":
        try:
            out = _flash(_fa3 if name == "fa3" else _fa2, q, k, v)
        except (RuntimeError, ValueError, TypeError) as e:  # unsupported head size / dtype in this build
            log.warning("attention backend %s failed for head size %d (%s: %s); using the next one from now on",
                        name, q.shape[-1], type(e).__name__, str(e).splitlines()[0][:200])
            _skipped.add(name)
            return attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    if torch.compiler.is_compiling():  # logging and the module global would break the graph under train.compile
        return out
    key = (name, q.device.type, q.dtype)
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend: %s (device %s, dtype %s, head size %d)", name, q.device.type,
                 str(q.dtype).replace("torch.", ""), q.shape[-1])
    last_backend = name
    return out
