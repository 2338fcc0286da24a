#!/usr/bin/env bash
# The checks that need a GPU, as one run on a lent GPU machine whose Python already holds
# torch but not the whole lock (docs/development.md, "On a GPU"):
#   bash benchmarks/gpu_checks.sh wheels   # on a machine with the registry: the missing
#                                          # packages, as Python 3.12 wheels, into .whl/
#   bash benchmarks/gpu_checks.sh run      # on the GPU machine: install .whl/ into
#                                          # /tmp/site, run the checks, logs into $OUT
# What it checks: the LoRA training paths on CUDA (bf16 autocast, gradient checkpointing)
# on every family, the pipeline-level tests on CUDA, and SD1.5's whole probe stage
# (32 sites x 50 steps x 3 pairs, N = 2,000; goal: under 60 s).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image (KINDS.md of the device tool: Python 3.12, torch 2.11, transformers
# 5.17, huggingface-hub 1.33) lacks, at requirements.lock's versions. Its own torch, numpy,
# pandas, scikit-learn, peft, transformers and huggingface-hub stay: the lock's hub (2.x)
# needs httpx2, which the image lacks, and diffusers takes the image's 1.33.
PACKAGES=(diffusers zarr numcodecs donfig google-crc32c importlib-metadata lazy-importer)

wheels() {
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for name in "${PACKAGES[@]}"; do
        pin=$(grep -i "^${name}==" requirements.lock)
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pin"
    done
    du -sh .whl
}

run() {
    OUT=${OUT:-results/gpu-checks}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ICM_TEST_DEVICE=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    # The image's transformers is not the lock's: the lock test is left out, not a device check.
    python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/finetuning/test_lora.py::test_the_gpu_training_paths_run_on_every_family \
        tests/hooks/test_capture.py tests/generation/test_samples.py tests/generation/test_shard.py \
        --deselect tests/generation/test_shard.py::test_a_store_records_the_locked_versions 2>&1 \
        | tee "$OUT/tests.log" || true
    python3 benchmarks/probe_stage.py --device cuda --check-sites 2 --jobs 1 3 --folder /tmp/stage \
        --out "$OUT/probe_stage.json" 2>&1 | grep -v Warning | tee "$OUT/probe_stage.log"
}

"${1:?usage: gpu_checks.sh wheels|run}"
