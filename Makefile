# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
# This workplace's machines hold torch 2.14.1 / torchvision 0.29.1 on disk and cap pip there
# (/etc/xdg/pip); anywhere else pip resolves torch normally (override: make TORCH_PIN=...).
TORCH_PIN ?= $(if $(wildcard /etc/xdg/pip/constraints.txt),torch==2.14.1 torchvision==0.29.1,)
DEMO_TARGET ?= results/toy/color/table.csv results/toy/objects/head-maps/curve.png
# The demo's sizes (configs/demo.yaml); `make study` runs the same targets at full size.
DEMO_CONFIG ?= --configfile config.yaml configs/demo.yaml
PYTEST_FLAGS ?= -n 2 --dist worksteal --durations=15

.PHONY: install lock demo study report test check lint bench clean toy-model toy-quality

# Exact versions of everything but the torch stack, which follows TORCH_PIN (or pip's
# choice for this machine); `make lock` regenerates it from pyproject.toml's ranges.
LOCK := requirements.lock
# MTCNN's torch code and weights (`face.detector: mtcnn`), without its outdated pins (pyproject.toml)
FACENET := facenet-pytorch==2.6.0
TORCH_STACK := ^(torch|torchvision|triton|nvidia-|cuda-)

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_PIN),$(BIN)/python -m pip install --quiet $(TORCH_PIN))
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e '.[test]' $(FACENET)
	touch $@

install: $(VENV)/.installed

lock: install  ## re-resolve pyproject.toml's ranges into requirements.lock (docs/development.md)
	$(BIN)/python -m pip install --quiet pip-tools
	printf '%s\n' $(TORCH_PIN) > $(VENV)/torch-constraints.txt
	$(BIN)/pip-compile --quiet --extra test --strip-extras --no-emit-index-url \
		--no-emit-find-links --constraint $(VENV)/torch-constraints.txt \
		--output-file $(LOCK) pyproject.toml
	awk '/^[^ #]/ {skip = ($$0 ~ /$(TORCH_STACK)/)} !skip' $(LOCK) > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	@echo "$(LOCK): $$(grep -c '==' $(LOCK)) pinned packages (the torch stack left to TORCH_PIN)"

demo: install  ## the toy study at demo size (configs/demo.yaml), then its results
	$(BIN)/snakemake --cores $(CORES) $(DEMO_TARGET) $(DEMO_CONFIG)
	@$(MAKE) --no-print-directory report

study: install  ## the same targets at full size (config.yaml alone), then its results
	$(BIN)/snakemake --cores $(CORES) $(DEMO_TARGET)
	@$(MAKE) --no-print-directory report

report:  ## print what the last demo or study made
	$(BIN)/python -m icm inspect results/toy/color/generation/shard-000/activations.zarr
	@echo; echo "Top sites (results/toy/color/ranking.csv; heatmap: results/toy/color/ranking_heatmap.png):"
	@head -6 results/toy/color/ranking.csv | cut -d, -f1-4 | column -t -s,
	@echo; echo "Debiasing by steering (results/toy/color/table.csv; grid.png, metrics.png beside it):"
	@$(BIN)/python -c "import pandas as pd; t = pd.read_csv('results/toy/color/table.csv'); print(t[['variant', 'alpha', 'FD', 'FD_draw_floor', 'FID', 'CLIP-I', 'CLIP-T']].round(3).to_string(index=False))"
	@echo; echo "Steering toward one colour (results/toy/color/target-*/table.csv; calibration/tradeoff.png):"
	@$(BIN)/python -c "import glob, pandas as pd; t = pd.concat([pd.read_csv(p) for p in sorted(glob.glob('results/toy/color/target-*/table.csv'))]); print(t.pivot(index='variant', columns='target', values='success_rate').round(2).to_string())"
	@echo; echo "Head maps: held-out mIoU at tau 0.4, top-k heads vs all (results/toy/objects/head-maps/table.csv; curve.png, overlays.png):"
	@$(BIN)/python -c "import pandas as pd; t = pd.read_csv('results/toy/objects/head-maps/table.csv'); t = t[(t.split == 'held-out') & (t.tau == 0.4) & t.method.isin(['all', 'topk'])]; print(t.pivot_table(index=['relevance', 'k'], columns='word', values='miou').round(3).to_string())"

test: install  ## the whole test suite, slow end-to-end tests included
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

check: install  ## the fast loop: everything but tests marked slow
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m "not slow"

lint: install
	$(BIN)/snakemake --lint

bench: install
	$(BIN)/python benchmarks/capture_overhead.py

toy-model: install  ## retrain the toy model and its feature extractor (~40 min), install them
	$(BIN)/snakemake --cores $(CORES) --forcerun train_toy_model train_toy_features \
		-- results/models/toy results/models/toy-features.safetensors
	rm -rf resources/models/toy && cp -r results/models/toy resources/models/toy
	cp results/models/toy-features.safetensors results/models/toy-features.json resources/models/

toy-quality: install  ## oracle read-out of the toy model (the numbers in docs/toy.md)
	$(BIN)/snakemake --cores $(CORES) --forcerun measure_toy_quality -- results/toy/quality.md
	cat results/toy/quality.md

clean:
	rm -rf results/models results/*/ logs .snakemake
