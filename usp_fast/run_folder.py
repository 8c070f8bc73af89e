"""The run folder's guard: a training run never wipes, mixes into or silently changes another run.

`open_run` decides, on rank 0 and before any model or data is built, where a Trainer-based stage starts:
- a fresh start (no --resume) into a folder that holds checkpoints or exports is refused, naming the two ways on
  (--resume auto, or another run.name); --overwrite first removes what the previous run trained;
- --resume auto takes the newest intact checkpoint; a folder with no finished checkpoint starts at step 0 (so one
  job script serves the first start and every requeue), but one whose finished checkpoints all fail their integrity
  check is an error, never a silent restart;
- resuming from a checkpoint older than the newest is refused unless --overwrite (which deletes the newer ones,
  whose trajectory is abandoned: a later --resume auto would pick them up);
- a resume whose config changes the trajectory (lr, batch, schedule, model, data, seed, ...) is refused unless
  --allow-config-change, naming every changed key;
- rank 0 holds an exclusive lock on <run>/.lock while the run writes the folder: a second run is refused in one
  line. The lock is an fcntl lock, released by the kernel however the process ends (kill -9 included); on a
  network filesystem it needs working POSIX locks (NFSv4, Lustre and GPFS have them).
"""
import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from .artifacts import CKPT_DIR, METRICS, checkpoint_root, complete_checkpoints, latest_good_checkpoint, \
    verify_checkpoint
from .config import flatten
from .errors import UserError

log = logging.getLogger(__name__)

LOCK = ".lock"
CONFIG = "config.yaml"
EXPORTS = ("export/encoder.json", "generator/generator.json")
# what a training run writes, removed by --overwrite (train.log is appended to, samples/ belong to `sample`)
TRAINED = (CKPT_DIR, "export", "generator", "generator.json", "transfer.json", METRICS, "tb", "loss.png")
# config keys that do not change which samples, noise, lr or weights a step sees: free to change on resume
FREE_KEYS = {"run.out_dir", "run.name", "data.num_workers", "data.prefetch", "data.auto_cache", "vae.encode_batch",
             "train.micro_batch", "train.zero_stage", "train.log_every", "train.ckpt_every", "train.keep_last",
             "train.export", "train.run_steps", "train.audit_samples", "train.activation_checkpointing",
             "train.compile", "train.compile_backend", "train.deepspeed_config"}
FREE_PREFIXES = ("sample.", "finetune.eval_batch", "finetune.val_cache_dir", "train.deepspeed_config.")


class RunFolderError(UserError, FileExistsError):
    pass


def config_changes(old, new):
    """-> ['key: old -> new'] for every trajectory-changing key that differs between two config dicts."""
    a, b = flatten(old), flatten(new)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)
                     and k not in FREE_KEYS and not k.startswith(FREE_PREFIXES))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed]


def previous_outputs(rdir):
    """What an earlier run left in `rdir` that a fresh start would lose: checkpoints and exports."""
    rdir = Path(rdir)
    found = [p for p in EXPORTS if (rdir / p).is_file()]
    root = checkpoint_root(rdir)
    if root.is_dir() and any(root.glob("step_*")):
        found.insert(0, f"{CKPT_DIR}/")
    return found


def remove_trained(rdir):
    """--overwrite: delete what a training run wrote into `rdir` (checkpoints, exports, metrics, TensorBoard)."""
    for name in TRAINED:
        p = Path(rdir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def choose_start(rdir, resume, overwrite=False, allow_config_change=False, config=None):
    """The checkpoint a run in `rdir` starts from (None: step 0), after the checks above. `config`: the new run's
    config as a dict, compared with the folder's config.yaml on resume. Raises RunFolderError or CheckpointError."""
    rdir, root = Path(rdir), checkpoint_root(rdir)
    ways = "continue it with --resume auto, start another with run.name=<new name>, or discard it with --overwrite"
    if not resume:
        found = previous_outputs(rdir)
        if found and not overwrite:
            raise RunFolderError(f"run folder {rdir} already holds {' and '.join(found)} of an earlier run: {ways}")
        if found:
            log.warning("--overwrite: removing %s from %s", ", ".join(found), rdir)
            remove_trained(rdir)
        return None
    finished = complete_checkpoints(root)
    if resume == "auto":
        ckpt = latest_good_checkpoint(root)
        if ckpt is None and finished:
            raise RunFolderError(f"--resume auto: none of the {len(finished)} finished checkpoint(s) in {root} passes "
                                 "its integrity check (see the warnings above); resume from a copy, or start again "
                                 "with --overwrite")
        if ckpt is None:
            log.info("--resume auto: no finished checkpoint in %s yet, starting at step 0", root)
            return None
    else:
        ckpt = Path(resume)
        verify_checkpoint(ckpt)
    step = verify_checkpoint(ckpt, checksums=False)["step"]  # (auto's choice is verified already)
    newer = [p for s, p in finished if s > step]
    if resume == "auto":  # the newer ones failed their check: set aside (kept for inspection), never reused
        for p in newer:
            p.rename(p.with_name(f"{p.name}.damaged"))
            log.warning("set the damaged checkpoint %s aside as %s.damaged", p, p.name)
        newer = []
    if newer and not overwrite:
        raise RunFolderError(f"--resume {ckpt}: {len(newer)} newer checkpoint(s) ({newer[-1].name}, ...) exist in "
                             f"{root}; resuming here abandons them: add --overwrite to delete them, or --resume auto")
    for p in newer:
        log.warning("--overwrite: deleting %s (newer than the resumed %s)", p, ckpt.name)
        shutil.rmtree(p)
    saved = rdir / CONFIG
    if config is not None and saved.is_file():
        changes = config_changes(yaml.safe_load(saved.read_text()), config)
        if changes and not allow_config_change:
            raise RunFolderError(f"--resume: the config differs from {saved} in what changes the training "
                                 f"({'; '.join(changes)}): undo the change, start another run.name, or add "
                                 "--allow-config-change")
        if changes:
            log.warning("--allow-config-change: resuming with %s", "; ".join(changes))
    return ckpt


class RunLock:
    """An exclusive lock on <run>/.lock (held by rank 0 while the run writes the folder)."""

    def __init__(self, rdir):
        rdir = Path(rdir)
        rdir.mkdir(parents=True, exist_ok=True)
        self.file = open(rdir / LOCK, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunFolderError(f"run folder {rdir} is in use by another run ({holder}): wait for it to end, "
                                 "or start this one with another run.name") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()

    def release(self):
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


@contextlib.contextmanager
def disk_full_is_one_line(path, what):
    """Turn running out of space while writing `what` under `path` into one UserError line. PyTorch's zip writer
    reports a full disk as 'unexpected pos ...' without the errno, so that is checked against the free space."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(Path(path) if Path(path).exists() else Path(path).parent).free
        if getattr(e, "errno", None) == 28 or "No space left" in str(e) or (
                "unexpected pos" in str(e) and free < 1 << 30):
            raise UserError(f"no space left on the device of {path} while writing {what} ({free >> 20} MiB "
                            "free): free space or move run.out_dir, then --resume auto") from None
        raise
