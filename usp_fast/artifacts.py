"""The run directory and every artifact in it: paths, checkpoints (discovery, integrity, loading through
DeepSpeed's public API for ZeRO 0-3), the encoder export and the generator export.

    runs/<name>/                     run_dir(cfg.run)
        config.yaml                  the resolved config
        metrics.jsonl, tb/, loss.png one row per log interval (never a step twice), TensorBoard
        checkpoints/step_NNNNNNNN/   DeepSpeed files + COMPLETE (written last: step, and each file's size and
                                     sha256; a checkpoint that fails it is skipped, --resume auto falls back)
        export/                      encoder.safetensors + encoder.json (--stage pretrain)
        generator/                   model.safetensors, ema.safetensors, generator.json (--stage generate)
        generator.json               written at the start of a generate run: checkpoints are sampleable

Exports load in one line: `USPViT.from_pretrained(dir)`, `DiT.from_pretrained(dir)` (both call into here).
"""
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from .errors import CheckpointError, UserError
from .io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
METRICS = "metrics.jsonl"
ENCODER_FORMAT = "usp-fast-encoder/1"
GENERATOR_FORMAT = "usp-fast-generator/1"


class ExportError(UserError, ValueError):
    pass


# ---- paths ----
def run_dir(run_cfg):
    """The run directory of a config's `run` section."""
    return Path(run_cfg.out_dir) / run_cfg.name


def checkpoint_root(rdir):
    return Path(rdir) / CKPT_DIR


def checkpoint_tag(step):
    return f"step_{step:08d}"


# ---- checkpoints ----
def _sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_complete_marker(ckpt_dir, step):
    """Record the step and every file's size and sha256; written last and atomically, so its presence means the
    checkpoint was finished and its contents say what a finished one holds."""
    ckpt_dir = Path(ckpt_dir)
    files = {str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != COMPLETE}
    atomic_write_text(ckpt_dir / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))


def verify_checkpoint(ckpt_dir, checksums=True):
    """Raise CheckpointError naming the first file that is missing, truncated or altered since it was written."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir}: no {COMPLETE} marker (an unfinished save)")
    try:
        record = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {COMPLETE} is not valid JSON ({e})") from None
    files = record.get("files")
    if not files:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {COMPLETE} lists no files (written by an older version?)")
    for name, want in files.items():
        p = ckpt_dir / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {name} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {name} has {size} bytes, {want['size']} were written")
        if checksums and _sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {name} does not match its recorded sha256")
    return record


def complete_checkpoints(root):
    """Checkpoints with a COMPLETE marker, oldest first, as (step, path); not yet verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("step_*"):
        if (p / COMPLETE).exists() and p.name.split("_")[1].isdigit():
            found.append((int(p.name.split("_")[1]), p))
    return sorted(found)


def latest_good_checkpoint(root):
    """The newest checkpoint that passes verify_checkpoint; each one that fails is named and skipped. -> path or
    None."""
    for _, path in reversed(complete_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log.warning("%s; skipping it and falling back to the previous complete checkpoint", e)
    return None


def prune_checkpoints(root, step, keep_last):
    """After saving `step`: delete all but the newest `keep_last` finished checkpoints up to it, the new one
    always kept, counted whether or not they would pass their integrity check. Checkpoints past `step` are never
    touched (usp_fast.run_folder refuses to resume below them without --overwrite, which deletes them)."""
    older = [p for s, p in complete_checkpoints(root) if s < step]
    for old in older[:max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _model_states_file(ckpt_dir):
    """DeepSpeed's per-checkpoint model-states file: mp_rank_00_model_states.pt (ZeRO 0-2) or
    zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3). It holds the client state (step, EMA)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (Path(ckpt_dir) / name).is_file():
            return Path(ckpt_dir) / name
    raise CheckpointError(f"{ckpt_dir}: no DeepSpeed model-states file (expected mp_rank_00_model_states.pt): not a "
                          "checkpoint folder of a usp-fast run")


def read_checkpoint(ckpt_dir):
    """-> (fp32 module state dict, client state {'step', 'task', ...}) of a DeepSpeed checkpoint folder, through
    DeepSpeed's public API: ZeRO 1-3 checkpoints are consolidated from the fp32 master partitions
    (`get_fp32_state_dict_from_zero_checkpoint`); ZeRO-0 ones hold the module weights directly."""
    ckpt_dir = Path(ckpt_dir)
    states = _model_states_file(ckpt_dir)
    try:
        saved = torch.load(states, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: name it
        raise CheckpointError(f"{states}: cannot be read ({type(e).__name__}: {e})") from None
    client = {k: v for k, v in saved.items() if k in ("step", "task")}
    if any(ckpt_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    else:
        state = saved.get("module")
        if not state:
            raise CheckpointError(f"{states}: holds no module weights")
    return {k: v.float() for k, v in state.items()}, client


# ---- the encoder export ----
def save_encoder(model, out_dir, model_name, vae_identity=None, resolution=None, step=None, epoch=None,
                 extra_meta=None):
    """USPViT -> <out_dir>/encoder.safetensors (timm names, fp32) + encoder.json (architecture, VAE, step...)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.encoder_state_dict().items()}
    with atomic_path(out_dir / "encoder.safetensors") as tmp:
        save_file(tensors, str(tmp))
    meta = {"format": ENCODER_FORMAT, "model": model_name, "config": model.encoder_config(), "vae": vae_identity,
            "resolution": resolution, "step": step, "epoch": epoch, **(extra_meta or {})}
    atomic_write_text(out_dir / "encoder.json", json.dumps(meta, indent=2))
    return out_dir


def _export_json(path, what, fix="copy the export folder again"):
    """An export's JSON description; a damaged one -> ExportError naming the file."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ExportError(f"{path}: damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); expected the "
                          f"JSON description of {what}: {fix}") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: a JSON {type(meta).__name__}, expected the JSON object describing {what}")
    return meta


def _export_tensors(path, what):
    """An export's safetensors file; a truncated or foreign one -> ExportError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path}: damaged or truncated ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"expected the weights of {what}: copy the export folder again") from None


def load_encoder(path):
    """-> (state_dict, meta). `path` is the export directory or its encoder.safetensors."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist: expected an encoder export folder from --stage pretrain "
                          "(runs/<name>/export)")
    d = path if path.is_dir() else path.parent
    st, js = d / "encoder.safetensors", d / "encoder.json"
    for f in (st, js):
        if not f.is_file():
            raise ExportError(f"{f} is missing: expected an encoder export from --stage pretrain")
    what = "an encoder export from --stage pretrain"
    meta = _export_json(js, what)
    if meta.get("format") != ENCODER_FORMAT:
        raise ExportError(f"{js}: format {meta.get('format')!r}, expected {ENCODER_FORMAT!r}")
    return _export_tensors(st, what), meta


# ---- the generator export ----
def save_generator(out_dir, weights, ema_weights, meta):
    """fp32 weights (and EMA weights) -> <out_dir>/{model,ema}.safetensors + generator.json."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, tensors in (("model.safetensors", weights), ("ema.safetensors", ema_weights)):
        with atomic_path(out_dir / name) as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    atomic_write_text(out_dir / "generator.json", json.dumps({"format": GENERATOR_FORMAT, **meta}, indent=1))
    return out_dir


def load_generator_weights(path, use_ema=True):
    """A generator/ folder or a checkpoint folder of a generate run -> (fp32 state dict, meta). A checkpoint's
    model description is its run's generator.json."""
    what = "a generator export from --stage generate"
    path = Path(path)
    if (path / "generator.json").exists():
        meta = _export_json(path / "generator.json", what)
        weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
        if not weights.is_file():
            raise ExportError(f"{weights} is missing: expected {what} (model.safetensors, ema.safetensors, "
                              "generator.json)")
        state = _export_tensors(weights, what)
    elif (path / COMPLETE).exists():
        desc = path.parent.parent / "generator.json"
        if not desc.is_file():
            raise ExportError(f"{desc} is missing: {path} is not a checkpoint of a generate run")
        meta = _export_json(desc, "a generate run's generator", "copy the run folder again, or sample from its "
                            "generator/ folder")
        state, client = read_checkpoint(path)
        if use_ema:
            ema = (client.get("task") or {}).get("ema")
            if ema is None:
                raise ExportError(f"{path}: the checkpoint holds no EMA weights")
            state.update({k: v.float() for k, v in ema.items()})
        meta["step"] = int(client.get("step", meta.get("step") or 0))
    else:
        raise ExportError(f"{path}: neither a generator/ folder (generator.json) nor a complete checkpoint folder")
    if meta.get("format") != GENERATOR_FORMAT:
        raise ExportError(f"{path}: format {meta.get('format')!r}, expected {GENERATOR_FORMAT!r}")
    return state, meta


def find_generator(rdir, checkpoint=None):
    """`checkpoint`, else <run>/generator/, else the run's newest complete checkpoint."""
    if checkpoint:
        return Path(checkpoint)
    rdir = Path(rdir)
    if (rdir / "generator" / "generator.json").exists():
        return rdir / "generator"
    found = complete_checkpoints(checkpoint_root(rdir))
    if not found:
        raise ExportError(f"no generator weights under {rdir}: train it with --stage generate first, or pass "
                          "sample.checkpoint=<generator dir or checkpoint folder>")
    return found[-1][1]


# ---- metrics ----
def read_metrics(rdir):
    """Rows of metrics.jsonl (a torn last line from a killed run is dropped)."""
    path = Path(rdir) / METRICS
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(rdir, step):
    """Keep only rows up to `step`: a run (re)starting at `step` writes the later ones again, so no step is ever
    recorded twice, however the previous run ended."""
    path = Path(rdir) / METRICS
    if path.exists():
        rows = [r for r in read_metrics(rdir) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
