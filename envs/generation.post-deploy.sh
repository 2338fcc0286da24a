#!/usr/bin/env bash
# Run by Snakemake (`--sdm conda`) inside the new environment, in Snakemake's working
# directory, which is this repository when the workflow is run as README.md says. A path in
# the .yaml's pip section would not do: Snakemake copies the .yaml under .snakemake/conda/
# and conda resolves such paths from the copy's folder.
set -euo pipefail
if ! grep -qs '^name = "icm"' pyproject.toml; then
    echo "run snakemake from the ICM repository (no icm pyproject.toml in $PWD)" >&2
    exit 1
fi
# The locked versions (requirements.lock, `make lock`), torch as pip chooses for this
# machine's platform; then the package itself, its dependencies already in place.
python -m pip install -r requirements.lock
python -m pip install --no-deps --editable . facenet-pytorch==2.6.0  # its pins are outdated
