# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
# This workplace's machines hold torch 2.14.1 / torchvision 0.29.1 on disk and cap pip there
# (/etc/xdg/pip); anywhere else pip resolves torch normally (override: make TORCH_PIN=...).
TORCH_PIN ?= $(if $(wildcard /etc/xdg/pip/constraints.txt),torch==2.14.1 torchvision==0.29.1,)
DEMO_TARGET ?= results/tiny-sd15/gender/generation/samples.csv
PYTEST_FLAGS ?= -n 2 --durations=15

.PHONY: install demo test check lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/python -m pip install --quiet $(TORCH_PIN))
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install  ## run the main job on the embedded default model
	$(BIN)/snakemake --cores $(CORES) $(DEMO_TARGET)
	$(BIN)/python -m icm inspect results/tiny-sd15/gender/generation/shard-000/activations.zarr

test: install  ## the whole test suite, slow end-to-end tests included
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

check: install  ## the fast loop: everything but tests marked slow
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m "not slow"

lint: install
	$(BIN)/snakemake --lint

bench: install
	$(BIN)/python benchmarks/capture_overhead.py

clean:
	rm -rf results/models results/*/ logs .snakemake
