"""One attention backend picker: flash-attn when installed and usable, else torch SDPA (which itself picks
flash / cuDNN / memory-efficient / math kernels for the device and dtype)."""
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional extra `usp-fast[flash]`; needs CUDA to build
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not usable here"
    flash_attn_func = None

_logged = set()


def backend_name(q):
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash-attn"
    return "sdpa"


def attention(q, k, v):
    """q, k, v [B, H, N, d] -> [B, H, N, d]."""
    name = backend_name(q)
    if name not in _logged:
        _logged.add(name)
        log.info("attention backend: %s (device %s, dtype %s)", name, q.device.type, q.dtype)
    if name == "flash-attn":
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
