"""The offline install of the GPU check: the wheels carried to the GPU image (benchmarks/gpu_wheels.json, the lock),
checked here against the image's package list (benchmarks/gpu_image_packages.txt) so that a missing wheel fails on
a CPU, in CI, and not in the GPU slot.

    python benchmarks/offline_install.py check          resolution of the lock + setup.py against the image list
    python benchmarks/offline_install.py download DIR   fetch/build the locked wheels into DIR, verify (make gpu-wheels)
    python benchmarks/offline_install.py verify DIR     DIR holds exactly the locked wheels (names, versions, metadata)
    python benchmarks/offline_install.py lock DIR       rewrite the lock from DIR's wheels (after changing the set)
    python benchmarks/offline_install.py install DIR    on the GPU: verify, pip install --no-index --no-deps each
                                                        named wheel, then usp-fast itself, then check the live env

The check is a resolution done by hand, exactly as pip would judge the environment after the install: every
Requires-Dist of every carried wheel and of usp-fast (markers evaluated for CPython 3.12 on Linux x86_64, the image's
Python) must name a distribution that the image or the set provides, at a version its specifier contains. A carried
wheel replaces the image's copy (pip installs the named file). An image version that is only bounded (`name>=v`,
implied by a seen package's metadata) proves lower bounds alone; an unknown one proves nothing but presence. Each
wheel's tags and Requires-Python must suit cp312 manylinux x86_64. Standard library and `packaging` only: it runs on
the GPU image before anything is installed.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCK = HERE / "gpu_wheels.json"
IMAGE = HERE / "gpu_image_packages.txt"
PYTHON = "3.12.3"  # the image's python3 (KINDS.md pip list row)
MARKERS = {"python_version": PYTHON.rsplit(".", 1)[0], "python_full_version": PYTHON, "implementation_name": "cpython",
           "implementation_version": PYTHON, "platform_python_implementation": "CPython", "os_name": "posix",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "platform_release": "",
           "platform_version": "", "extra": ""}
# glibc of the image not read: accept wheels up to manylinux_2_28 (what `pip download` is asked for), no newer
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(28, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]
SUPPORTED_TAGS = set(tags.cpython_tags((3, 12), platforms=PLATFORMS)) | set(
    tags.compatible_tags((3, 12), "cp312", PLATFORMS))
DOWNLOAD = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[a for p in PLATFORMS[::-1][2:] for a in ("--platform", p)]]


class Provider:
    """A distribution available after the install: an exact version, a lower bound only, or presence only."""

    def __init__(self, version=None, lower=None, how=""):
        self.version, self.lower, self.how = version, lower, how

    def satisfies(self, spec):
        if not spec:
            return True
        if self.version is not None:
            return spec.contains(self.version, prereleases=True)
        if self.lower is not None:  # proves >= / > clauses at or below the bound, nothing else
            return all((s.operator == ">=" and self.lower >= Version(s.version))
                       or (s.operator == ">" and self.lower > Version(s.version)) for s in spec)
        return False

    def __str__(self):
        have = self.version or (f">={self.lower}" if self.lower else "version not recorded")
        return f"{self.how} has {have}"


def read_image(path=IMAGE):
    """gpu_image_packages.txt -> {canonical name: Provider}. Lines: `name==v  # seen|assumed ...`, `name>=v  # implied
    ...` or `name  # version unknown`."""
    image = {}
    for raw in Path(path).read_text().splitlines():
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(?:(==|>=)\s*(\S+))?", line)
        if not m:
            raise ValueError(f"{path}: cannot read line {raw!r}")
        name, op, v = m.groups()
        how = f"the image ({comment.strip().split()[0].rstrip(':') if comment.strip() else 'listed'})"
        image[canonicalize_name(name)] = Provider(Version(v) if op == "==" else None,
                                                  Version(v) if op == ">=" else None, how)
    return image


def read_lock(path=LOCK):
    return json.loads(Path(path).read_text())["wheels"]


def project_requirements(setup_py=REPO / "setup.py"):
    """setup.py's install_requires, read without running it."""
    import ast

    for node in ast.walk(ast.parse(Path(setup_py).read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [ast.literal_eval(e) for e in node.value.elts]
    raise ValueError(f"{setup_py}: no install_requires")


def wheel_metadata(path):
    """A wheel file -> its lock entry: name, version, Requires-Python, non-extra Requires-Dist."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(meta).decode()
    headers = [line.split(": ", 1) for line in text.split("\n\n", 1)[0].splitlines() if ": " in line]
    get = lambda key: [v.strip() for k, v in headers if k == key]  # noqa: E731
    requires = [r for r in get("Requires-Dist") if "extra" not in str(Requirement(r).marker or "")]
    return {"file": Path(path).name, "name": get("Name")[0], "version": get("Version")[0],
            "requires_python": (get("Requires-Python") or [None])[0], "requires_dist": requires}


def check(wheels, image, project, carried=True):
    """-> the problems (one line each) of installing `wheels` with --no-deps on `image`, then usp-fast. carried=False:
    `image` already holds the wheels (the live environment after the install)."""
    errors, provided = [], dict(image)
    names = [canonicalize_name(w["name"]) for w in wheels]
    errors += [f"{n}: more than one wheel in the set (pip stops on two versions)" for n in sorted(set(names))
               if names.count(n) > 1]
    for w in wheels:
        if carried:
            provided[canonicalize_name(w["name"])] = Provider(Version(w["version"]), None, f"the wheel {w['file']}")
        name, version, _, wtags = parse_wheel_filename(w["file"])
        if canonicalize_name(name) != canonicalize_name(w["name"]) or version != Version(w["version"]):
            errors.append(f"{w['file']}: file name does not match its metadata {w['name']} {w['version']}")
        if not wtags & SUPPORTED_TAGS:
            errors.append(f"{w['file']}: no tag installable on cp312 manylinux<=2_28 x86_64")
        if w.get("requires_python") and PYTHON not in _spec(w["requires_python"]):
            errors.append(f"{w['file']}: needs Python {w['requires_python']}, the image has {PYTHON}")
    requirers = [(f"{w['name']} {w['version']}", w["requires_dist"]) for w in wheels] + [("usp-fast", project)]
    for who, requires in requirers:
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(MARKERS):
                continue
            if req.extras:
                errors.append(f"{req.name}: {who} needs extras {sorted(req.extras)}, which this check does not follow")
            p = provided.get(canonicalize_name(req.name))
            if p is None:
                errors.append(f"{req.name}: needed by {who} ({text}), in neither the image nor the wheel set")
            elif not p.satisfies(req.specifier):
                errors.append(f"{req.name}: {who} needs {req.specifier}, {p}")
    return errors


def _spec(text):
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(text)


def verify(folder, wheels):
    """-> problems of `folder` against the lock: each locked wheel there with the locked metadata, nothing else."""
    folder, errors = Path(folder), []
    present = {p.name for p in folder.glob("*.whl")} if folder.is_dir() else set()
    for w in wheels:
        if w["file"] not in present:
            errors.append(f"{w['file']}: missing from {folder} (make gpu-wheels)")
            continue
        got = wheel_metadata(folder / w["file"])
        if got != {k: w[k] for k in got}:
            errors.append(f"{w['file']}: metadata differs from the lock (rerun `offline_install.py lock {folder}`)")
    errors += [f"{f}: in {folder} but not in the lock" for f in sorted(present - {w["file"] for w in wheels})]
    return errors


def live_image():
    """The running environment's distributions as exact Providers (on the GPU: the real image, after the install);
    of two copies the one earlier on sys.path, the one imports find (a --target site on PYTHONPATH shadows)."""
    from importlib.metadata import distributions

    found = {}
    for d in distributions():
        if d.metadata["Name"]:
            name = canonicalize_name(d.metadata["Name"])
            found.setdefault(name, Provider(Version(d.version), None, "this environment"))
    return found


def download(folder, wheels, pip=(sys.executable, "-m", "pip")):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    for w in wheels:
        pin = f"{w['name']}=={w['version']}"
        if w.get("build") == "sdist":  # DeepSpeed: PyPI has only its sources; a pure-Python wheel without its ops
            cmd = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder), pin]
            subprocess.run(cmd, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
        else:
            subprocess.run([*pip, "download", "-q", *DOWNLOAD, "-d", str(folder), pin], check=True)


# setup.py's package_dir: the import names of usp-fast's folders, linked into a --target site
PACKAGES = {"usp_fast": "usp_fast", "usp_fast_kernels": "kernels", "usp_fast_benchmarks": "benchmarks"}


def install(folder, wheels, pip=(sys.executable, "-m", "pip"), project=REPO, site=None):
    """On the GPU image: the locked wheels, each named, with --no-index --no-deps; then usp-fast editable (built by
    the image's setuptools). With `site` (gpu_check.sh passes one when the image's environment is not writable):
    everything into that folder instead (`pip --target`, the device notes' way), usp-fast as links to its folders
    and a `bin/usp-fast` launcher; the caller puts `site` on PYTHONPATH and `site/bin` on PATH."""
    files = [str(Path(folder) / w["file"]) for w in wheels]
    where = ["--target", str(site)] if site else []
    subprocess.run([*pip, "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade", *where, *files],
                   check=True)
    if not site:
        subprocess.run([*pip, "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(project)],
                       check=True)
        return
    for name, folder_name in PACKAGES.items():
        link = Path(site) / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(project) / folder_name)
    launcher = Path(site) / "bin" / "usp-fast"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m usp_fast "$@"\n')
    launcher.chmod(0o755)


def writable_environment():
    import sysconfig

    return os.access(sysconfig.get_paths()["purelib"], os.W_OK)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("check", "download", "verify", "lock", "install"))
    parser.add_argument("folder", nargs="?", default=str(REPO / "wheels"))
    parser.add_argument("--image", default=str(IMAGE), help="the image's package list")
    parser.add_argument("--lock", default=str(LOCK))
    parser.add_argument("--site", help="install: into this folder (pip --target) when the environment is read-only")
    args = parser.parse_args(argv)
    lock = json.loads(Path(args.lock).read_text())
    wheels = lock["wheels"]
    errors = []
    if args.action == "lock":  # keeps each wheel's `build` (how `download` makes it)
        builds = {w["name"]: w["build"] for w in wheels if "build" in w}
        wheels = lock["wheels"] = [{**m, **({"build": builds[m["name"]]} if m["name"] in builds else {})}
                                   for m in map(wheel_metadata, sorted(Path(args.folder).glob("*.whl")))]
        Path(args.lock).write_text(json.dumps(lock, indent=1) + "\n")
    if args.action == "download":
        download(args.folder, wheels)
    if args.action in ("download", "verify", "install"):
        errors += verify(args.folder, wheels)
    if args.action == "install" and not errors:
        site = args.site if args.site and not writable_environment() else None
        install(args.folder, wheels, site=site)
        if site:
            print(f"offline install: the environment is read-only: installed into {site} (PYTHONPATH)")
            sys.path.insert(0, site)  # the live check below sees what the next stages will import
        # the proof on the image itself: every need of the set and of usp-fast met by what is really installed now
        errors += check(wheels, live_image(), project_requirements(), carried=False)
    elif args.action != "install":
        errors += check(wheels, read_image(args.image), project_requirements())
    for e in errors:
        print(f"offline install: {e}", file=sys.stderr)
    size = sum((Path(args.folder) / w["file"]).stat().st_size for w in wheels
               if (Path(args.folder) / w["file"]).is_file())
    print(f"offline install {args.action}: {len(wheels)} wheels ({size / 1e6:.1f} MB in {args.folder}), "
          f"{'OK' if not errors else f'{len(errors)} problem(s)'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
