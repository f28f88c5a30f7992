# Two entry points: `make test` and `make demo`. Both bootstrap .venv on first use and
# re-install only when setup.py changes (the stamp file tracks it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU torch unless a torch is already in the venv (GPU users install their CUDA torch first).
TORCH_CPU := torch==2.13.0
HOROVOD_VERSION := 0.28.1

.PHONY: test test-all demo demo-seeds bootstrap horovod bench

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

bootstrap: $(STAMP)

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests

test-all: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q --runslow tests

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) scripts/demo.py $(DEMO_ARGS)

# The demo table with three seeds on the same data: mean and spread of every row (about 25
# minutes on 2 cores; runs/demo_seeds/seeds_summary.json).
demo-seeds: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) scripts/demo.py --seeds 42,43,44 $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench.py --quick

# Horovod 0.28.1 forces C++14 but torch 2.x headers need C++17; patch the sdist and build it
# against the venv's torch with Gloo only (see docs/reproduce.md).
horovod: $(STAMP)
	scripts/build_horovod.sh $(PY) $(HOROVOD_VERSION)
