# Quickstart targets: each creates .venv and installs on first use, so a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test bench clean-venv

$(STAMP): setup.py constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	# torch first, from the pinned build, so nothing later can resolve a different one
	$(VENV)/bin/pip install -q -c constraints.txt torch torchvision
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## Quickstart 1: the demo pretrain run (data, latent cache, training, export)
	$(VENV)/bin/usp-fast train --stage pretrain --config configs/pretrain/demo.yaml

test: $(STAMP)  ## Quickstart 2: the test suite (CPU, fp32)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/usp-fast bench --suite all

clean-venv:
	rm -rf $(VENV)
