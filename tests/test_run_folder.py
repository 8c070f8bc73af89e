"""A run is never wiped, mixed into or silently changed (usp_fast.run_folder), and a full disk is one line."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_cfg
from usp_fast.artifacts import prune_checkpoints, read_metrics, write_complete_marker
from usp_fast.cli import main
from usp_fast.engine import Trainer
from usp_fast.errors import UserError
from usp_fast.run_folder import RunFolderError, RunLock, choose_start, config_changes
from usp_fast.stages.pretrain import PretrainStage


def _checkpoint(rdir, step, damaged=False):
    ckpt = Path(rdir) / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    write_complete_marker(ckpt, step)
    if damaged:
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x" * 3)
    return ckpt


def test_a_fresh_start_into_a_used_folder_is_refused_and_overwrite_clears_it(tmp_path):
    _checkpoint(tmp_path, 10)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "encoder.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n')
    with pytest.raises(RunFolderError, match=r"holds checkpoints/ and export/encoder.json.*--resume auto.*run.name"):
        choose_start(tmp_path, None)
    assert (tmp_path / "checkpoints" / "step_00000010").is_dir()  # nothing touched
    assert choose_start(tmp_path, None, overwrite=True) is None
    assert not any((tmp_path / n).exists() for n in ("checkpoints", "export", "metrics.jsonl"))
    assert choose_start(tmp_path, None) is None  # an empty (or new) folder is fine


def test_resume_auto_starts_a_new_run_but_refuses_one_whose_checkpoints_are_all_damaged(tmp_path, caplog):
    assert choose_start(tmp_path / "new", "auto") is None  # first start of a requeued job script
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)  # killed mid-save: no COMPLETE
    assert choose_start(tmp_path, "auto") is None
    _checkpoint(tmp_path, 10, damaged=True)
    _checkpoint(tmp_path, 20, damaged=True)
    with pytest.raises(RunFolderError, match="none of the 2 finished checkpoint"):
        choose_start(tmp_path, "auto")
    good = _checkpoint(tmp_path, 30)
    assert choose_start(tmp_path, "auto") == good


def test_resuming_below_newer_checkpoints_needs_overwrite_which_deletes_them(tmp_path):
    old, mid, new = (_checkpoint(tmp_path, s) for s in (10, 20, 30))
    with pytest.raises(RunFolderError, match=r"2 newer checkpoint\(s\) \(step_00000030"):
        choose_start(tmp_path, str(old))
    assert choose_start(tmp_path, str(mid), overwrite=True) == mid
    assert old.is_dir() and mid.is_dir() and not new.exists()


def test_keep_last_never_deletes_the_new_checkpoint_or_a_newer_one(tmp_path):
    root = tmp_path / "checkpoints"
    ckpts = {s: _checkpoint(tmp_path, s, damaged=s == 30) for s in (10, 20, 30, 40, 600)}
    prune_checkpoints(root, 40, keep_last=2)
    assert sorted(int(p.name[5:]) for p in root.iterdir()) == [30, 40, 600]
    prune_checkpoints(root, 40, keep_last=1)
    assert sorted(int(p.name[5:]) for p in root.iterdir()) == [40, 600] and ckpts[40].is_dir()


def test_a_resume_that_changes_the_training_is_refused_naming_the_keys(tmp_path):
    old = {"optim": {"lr": 1e-4}, "train": {"global_batch": 256, "log_every": 50, "micro_batch": 32},
           "sample": {"steps": 50}}
    new = {"optim": {"lr": 2e-4}, "train": {"global_batch": 512, "log_every": 10, "micro_batch": 16},
           "sample": {"steps": 250}}
    assert config_changes(old, new) == ["optim.lr: 0.0001 -> 0.0002", "train.global_batch: 256 -> 512"]
    ckpt = _checkpoint(tmp_path, 10)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(RunFolderError, match=r"optim.lr: 0.0001 -> 0.0002; train.global_batch.*--allow-config"):
        choose_start(tmp_path, "auto", config=new)
    assert choose_start(tmp_path, "auto", config=new, allow_config_change=True) == ckpt
    free = {**old, "train": {**old["train"], "log_every": 10, "micro_batch": 8}, "sample": {"steps": 250}}
    assert choose_start(tmp_path, "auto", config=free) == ckpt  # logging, micro-batch and sampling are free


def test_a_locked_folder_refuses_a_second_run_until_its_holder_dies(tmp_path):
    lock = RunLock(tmp_path)
    with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {os.getpid()} on"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()
    code = f"from usp_fast.run_folder import RunLock; held = RunLock({str(tmp_path)!r}); print('locked', flush=True); " \
           "import time; time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
        RunLock(tmp_path)
    holder.send_signal(signal.SIGKILL)  # kill -9: the kernel drops the lock
    holder.wait()
    RunLock(tmp_path).release()


@pytest.fixture
def pretrain_cfg(tmp_path, built_cache, tiny_vae_dir):
    def cfg(*extra):
        return make_cfg(tmp_path, built_cache.data.root, tiny_vae_dir, f"data.cache_dir={built_cache.data.cache_dir}",
                        "train.max_steps=4", "train.ckpt_every=2", "train.log_every=1", "run.name=r", *extra)
    return cfg


def test_rerunning_a_finished_run_loses_nothing(pretrain_cfg, tmp_path, capsys):
    """The README's rerun line: the same command again after the run finished."""
    cfg = pretrain_cfg()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", "--stage", "pretrain", "--config", str(config)])["export"]
    rdir = Path(cfg.run.out_dir) / "r"
    files = [rdir / "metrics.jsonl", *(rdir / "export").iterdir(), *(rdir / "checkpoints").rglob("*")]
    before = {p: p.read_bytes() for p in files if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--stage", "pretrain", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--resume auto" in err and str(rdir) in err
    assert {p: p.read_bytes() for p in before} == before and len(read_metrics(rdir)) == 4
    # and --resume auto on the finished run trains nothing more and keeps every row
    main(["train", "--stage", "pretrain", "--config", str(config), "--resume", "auto"])
    assert [r["step"] for r in read_metrics(rdir)] == [1, 2, 3, 4]
    assert (rdir / "export" / "encoder.safetensors").read_bytes() == before[rdir / "export" / "encoder.safetensors"]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(pretrain_cfg, monkeypatch):
    Trainer(c := pretrain_cfg("train.run_steps=2"), PretrainStage(c)).train()
    trainer = Trainer(c := pretrain_cfg(), PretrainStage(c), resume="auto")

    def full(*args, **kwargs):
        Path(args[0], kwargs["tag"]).mkdir()  # DeepSpeed had begun writing
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.engine, "save_checkpoint", full)
    with pytest.raises(UserError, match=r"^no space left on the device of .*checkpoint step_00000004"):
        trainer.train()
    root = Path(c.run.out_dir) / "r" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002"]  # the partial save is gone, the last kept
    trainer = Trainer(c, PretrainStage(c), resume="auto")  # the lock was released

    def zip_full(*args, **kwargs):  # what torch.save says on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed; unexpected pos 2048 vs 1024")

    monkeypatch.setattr(trainer.engine, "save_checkpoint", zip_full)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    with pytest.raises(UserError, match="no space left.*1 MiB free"):
        trainer.train()


def test_two_runs_into_one_folder_the_second_is_refused(pretrain_cfg):
    first = Trainer(c := pretrain_cfg(), PretrainStage(c))
    with pytest.raises(RunFolderError, match="in use by another run"):
        Trainer(c, PretrainStage(c), resume="auto")
    first.train()
    assert [r["step"] for r in read_metrics(Path(c.run.out_dir) / "r")] == [1, 2, 3, 4]
    assert json.loads((Path(c.run.out_dir) / "r" / "export" / "encoder.json").read_text())["step"] == 4
    Trainer(c, PretrainStage(c), resume="auto").close()  # the lock is free again
