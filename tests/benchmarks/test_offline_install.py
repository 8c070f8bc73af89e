"""The GPU check's offline install, proven on a CPU: the locked wheel set (benchmarks/gpu_wheels.json) and usp-fast
installed with --no-index --no-deps onto the GPU image's package list (benchmarks/gpu_image_packages.txt).

Why this is sound without downloading anything: `pip install --no-index --no-deps` never resolves, so what breaks
on the GPU is a need that nothing installed meets (an ImportError in the slot). The check evaluates every
Requires-Dist of every carried wheel and of setup.py, markers for CPython 3.12 on Linux x86_64, against exactly
what will be installed: the image list, where a carried wheel replaces the image's copy. The lock holds each
wheel's real METADATA; `offline_install.py verify` (run by `make gpu-wheels` and by the GPU's install stage before
it installs) proves the carried folder is the lock, file by file, and the install stage repeats the check against
the image's real versions. A second, independent judge is pip itself: `pip check` in a stub environment holding
the image list as dist-info stubs, the set as stub wheels made from the lock, and usp-fast installed editable."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from usp_fast_benchmarks import offline_install as oi

REPO = Path(__file__).resolve().parents[2]


def _without(name):
    return [w for w in oi.read_lock() if w["name"].lower().replace("_", "-") != name]


def test_the_locked_set_meets_every_need_of_itself_and_usp_fast_on_the_image():
    wheels = oi.read_lock()
    assert oi.check(wheels, oi.read_image(), oi.project_requirements()) == []
    names = {w["name"].lower().replace("_", "-") for w in wheels}
    # what the image lacks and usp-fast imports at run time, and the pydantic the image's typing-extensions fails
    assert {"deepspeed", "diffusers", "pydantic", "pydantic-core", "torch-fidelity", "importlib-metadata",
            "typing-extensions"} <= names
    assert len(wheels) == len(names)  # one version of each: two stop the whole install


@pytest.mark.parametrize("name, needed_by", [
    ("typing-extensions", "pydantic"),     # >=4.16: the image's is only known to be >=4.10 (torch 2.11's need)
    ("importlib-metadata", "diffusers"),   # not in the image at all
    ("lazy-importer", "importlib_metadata"),  # needed on Python < 3.15 only: the marker is evaluated for 3.12
    ("hjson", "deepspeed"),
    ("pydantic", "usp-fast"),              # setup.py's own need
])
def test_removing_a_wheel_fails_the_check_and_names_it(name, needed_by):
    errors = oi.check(_without(name), oi.read_image(), oi.project_requirements())
    assert errors, name
    assert any(e.lower().replace("_", "-").startswith(name) and needed_by.lower() in e.lower() for e in errors), errors


def test_the_check_proves_only_what_the_image_list_says():
    P, V = oi.Provider, oi.Version
    image = {"exact": P(V("2.0")), "bounded": P(None, V("4.10")), "unknown": P()}
    def ok(*reqs, file="a-1.0-py3-none-any.whl", python=None):
        wheel = {"file": file, "name": "a", "version": "1.0", "requires_python": python, "requires_dist": list(reqs)}
        return oi.check([wheel], image, []) == []

    assert ok("exact>=1.5,<3") and not ok("exact<2")
    assert ok("bounded>=4.10") and ok("bounded>4.9") and not ok("bounded>=4.16") and not ok("bounded<5")
    assert ok("unknown") and not ok("unknown>=1")  # presence proves no version
    assert not ok("absent")
    assert ok('absent; python_version < "3.12"') and not ok('absent; python_version >= "3.12"')
    assert not ok("exact[extra]")  # extras would bring needs this check does not see
    assert not ok(python=">=3.13") and ok(python=">=3.11")
    assert not ok(file="a-1.0-cp311-cp311-manylinux_2_17_x86_64.whl")
    assert ok(file="a-1.0-cp312-abi3-manylinux_2_28_x86_64.whl")
    assert not ok(file="a-1.0-py3-none-manylinux_2_34_x86_64.whl")  # newer glibc than the image is known to have
    # a carried wheel replaces the image's copy; two of one name stop pip
    carried = [{"file": "exact-3.0-py3-none-any.whl", "name": "exact", "version": "3.0", "requires_dist": []}]
    needs = {"file": "a-1.0-py3-none-any.whl", "name": "a", "version": "1.0", "requires_dist": ["exact>=3"]}
    assert oi.check(carried + [needs], image, []) == []
    assert oi.check(carried * 2, image, [])


def _stub_wheel(folder, w):
    """A wheel holding only w's metadata (name, version, Requires-Python, Requires-Dist), pure-Python tagged."""
    dist = f"{w['name'].replace('-', '_')}-{w['version']}.dist-info"
    meta = [f"Metadata-Version: 2.1", f"Name: {w['name']}", f"Version: {w['version']}"]
    meta += [f"Requires-Python: {w['requires_python']}"] if w.get("requires_python") else []
    meta += [f"Requires-Dist: {r}" for r in w["requires_dist"]]
    path = Path(folder) / f"{w['name'].replace('-', '_')}-{w['version']}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}/METADATA", "\n".join(meta) + "\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", f"{dist}/METADATA,,\n{dist}/WHEEL,,\n{dist}/RECORD,,\n")
    return path


def _stub_env(root):
    """A venv without pip holding the image list as dist-info stubs (a bound or an unknown version as written:
    the bound itself, or 0), and the real setuptools (linked), which builds usp-fast's editable install there."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    import setuptools

    for name, p in oi.read_image().items():
        if name in ("setuptools", "pip"):
            continue
        dist = site / f"{name.replace('-', '_')}-{p.version or p.lower or '0'}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {p.version or p.lower or '0'}\n")
        (dist / "RECORD").write_text(f"{dist.name}/METADATA,,\n{dist.name}/RECORD,,\n")
    src = Path(setuptools.__file__).parent.parent
    for entry in [*src.glob("setuptools*"), src / "_distutils_hack"]:
        (site / entry.name).symlink_to(entry)
    return py, site


def _clean_env():  # nothing of this checkout on the stub's path
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _pip(py, *args, env=None):
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(py), *args], capture_output=True, text=True,
                          env=env or _clean_env(), cwd=py.parent)


@pytest.mark.parametrize("mode", ["environment", "target"])
def test_install_into_a_stub_image_with_no_index_then_pip_check(tmp_path, monkeypatch, mode):
    """The GPU's install (offline_install.install: each wheel named, --no-index --no-deps; usp-fast editable, or,
    where the image's environment is read-only, everything into a --target site put on PYTHONPATH) run by pip
    into an environment that holds only the image list; `pip check` there must find every need met, and must not
    once typing-extensions, carried for pydantic, is taken away."""
    wheels_dir = tmp_path / "wheels"
    wheels_dir.mkdir()
    # stubs are pure-Python tagged (pydantic-core's cp312 tag would not install on this Python; check() tests tags)
    lock = [{**w, "file": _stub_wheel(wheels_dir, w).name} for w in oi.read_lock()]
    project = tmp_path / "usp-fast"  # a copy: the editable build writes its egg-info beside setup.py
    project.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "usp_fast", project / "usp_fast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", project / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "benchmarks", project / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__", "results"))
    py, site = _stub_env(tmp_path / "env")
    target = tmp_path / "site" if mode == "target" else None

    monkeypatch.delenv("PYTHONPATH", raising=False)  # install's pip runs inherit this process's environment
    monkeypatch.chdir(tmp_path)
    oi.install(wheels_dir, lock, pip=(sys.executable, "-m", "pip", "--python", str(py)), project=project, site=target)
    if target:
        monkeypatch.setenv("PYTHONPATH", str(target))  # as gpu_check.sh sets it for every stage
        assert os.access(target / "bin" / "usp-fast", os.X_OK)
    env = {**_clean_env(), **({"PYTHONPATH": str(target)} if target else {})}
    proc = _pip(py, "check", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:]
    found = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('usp_fast_kernels').origin)"],
                           capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout
    assert Path(found.strip()).resolve() == (project / "kernels" / "__init__.py").resolve()

    gone = next((target or site).glob("typing_extensions-*.dist-info"))
    shutil.rmtree(gone)  # the carried copy: what is left is the image's (4.10 in target mode: only known >= 4.10)
    proc = _pip(py, "check", env=env)
    assert proc.returncode != 0 and "typing-extensions" in proc.stdout.lower().replace("_", "-"), proc.stdout


def test_verify_holds_the_folder_to_the_lock(tmp_path):
    """What the GPU installs is what was checked: the folder's wheels are the lock's, file by file, metadata equal."""
    lock = oi.read_lock()
    made = {w["file"]: _stub_wheel(tmp_path, w) for w in lock}
    for w in lock:  # name the stubs as the lock does (the real files' tags)
        made[w["file"]].rename(tmp_path / w["file"])
    assert oi.verify(tmp_path, lock) == []
    (tmp_path / lock[0]["file"]).unlink()
    _stub_wheel(tmp_path, {**lock[1], "name": "stray", "requires_dist": []})
    errors = oi.verify(tmp_path, lock)
    assert any(lock[0]["file"] in e and "missing" in e for e in errors)
    assert any(e.startswith("stray-") and "not in the lock" in e for e in errors)
    changed = [{**lock[1], "requires_dist": lock[1]["requires_dist"] + ["six"]}] + lock[2:]
    assert any("differs from the lock" in e for e in oi.verify(tmp_path, changed))


@pytest.mark.skipif(not (REPO / "wheels").is_dir(), reason="no wheels/ folder (make gpu-wheels makes it)")
def test_the_carried_folder_is_the_lock():
    assert oi.verify(REPO / "wheels", oi.read_lock()) == []


def test_the_image_list_is_readable_and_sourced():
    text = oi.IMAGE.read_text()
    image = oi.read_image()
    assert len(image) >= 190 and str(image["torch"].version) == "2.11.0" and str(image["triton"].version) == "3.6.0"
    assert image["typing-extensions"].version is None and str(image["typing-extensions"].lower) == "4.10.0"
    body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert all(any(tag in line for tag in ("# seen", "# assumed", "# implied", "# version unknown")) for line in body)
    assert json.loads(oi.LOCK.read_text())["wheels"]
