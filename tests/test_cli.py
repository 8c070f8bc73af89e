"""The `usp-fast` command: subcommands, one-line input errors from rank 0, --debug tracebacks, config keys."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from usp_fast.cli import main
from usp_fast.config import ConfigError
from usp_fast.stages import describe_keys

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "pretrain" / "demo.yaml")


def test_help_lists_every_subcommand():
    exe = shutil.which("usp-fast") or str(Path(sys.executable).parent / "usp-fast")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("train", "sample", "evaluate", "restore", "bench", "config"):
        assert f"\n    {cmd} " in out, (cmd, out)
    mod = subprocess.run([sys.executable, "-m", "usp_fast", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert mod == out  # python -m usp_fast is the same command


def test_the_console_script_exits_0_on_success():
    exe = shutil.which("usp-fast") or str(Path(sys.executable).parent / "usp-fast")
    out = subprocess.run([exe, "config", "show", "--config", DEMO], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "" and "demo_images: 128" in out.stdout


def test_a_config_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--stage", "pretrain", "--config", DEMO, "optim.schedule=cosin"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.schedule" in err and "'cosine'" in err and "Traceback" not in err
    with pytest.raises(ConfigError):  # --debug: the real exception, anywhere on the line
        main(["train", "--stage", "pretrain", "--config", DEMO, "--debug", "optim.schedule=cosin"])


def test_a_missing_data_root_fails_before_any_vae_or_model_loads(tmp_path, capsys, monkeypatch):
    import usp_fast.vae

    def no_vae(*a, **k):
        raise AssertionError("the VAE was loaded before the data root was checked")

    monkeypatch.setattr(usp_fast.vae, "load_vae", no_vae)
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "nope", tmp_path / "empty"):
        with pytest.raises(SystemExit):
            main(["train", "--stage", "cache", "--config", DEMO, f"data.root={root}", "data.demo_images=0",
                  f"run.out_dir={tmp_path}"])
        err = capsys.readouterr().err
        assert str(root) in err and "data.root" in err


def test_training_without_a_cache_says_how_to_build_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--stage", "pretrain", "--config", DEMO, "data.demo_images=0", "data.auto_cache=false",
              f"data.cache_dir={tmp_path / 'none'}", f"run.out_dir={tmp_path}"])
    assert "--stage cache" in capsys.readouterr().err


def test_config_keys_and_show(capsys):
    main(["config", "keys", "--stage", "generate"])
    out = capsys.readouterr().out
    for k, _, _, doc in describe_keys("generate"):
        assert k in out and doc in out
    main(["config", "show", "--stage", "pretrain", "--config", DEMO, "train.max_steps=3"])
    assert "max_steps: 3" in capsys.readouterr().out


def test_deepspeed_entry_point_is_the_train_command():
    out = subprocess.run([sys.executable, str(REPO / "usp_fast" / "train.py"), "--stage", "pretrain", "--config",
                          DEMO, "train.epochs=abc"], capture_output=True, text=True)
    assert out.returncode == 2 and "'train.epochs'" in out.stderr and "Traceback" not in out.stderr


def test_bench_passes_its_options_through_to_the_benchmark_runner(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nviews: many\n")
    with pytest.raises(SystemExit) as e:  # the fidelity suite's own preset check, reached through `usp-fast bench`
        main(["bench", "--suite", "fidelity", "--preset", str(bad), "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bad.yaml: 'views'" in err and len(err.strip().splitlines()) == 1
