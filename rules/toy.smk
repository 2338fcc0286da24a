# The toy world's models, trained from scratch into results/models/. The copies the workflow
# uses are committed under resources/ (`make toy-model` retrains and copies them there) and are
# deliberately NOT outputs of these rules: Snakemake reruns a job whose output is older than its
# script, and a fresh clone's file times would then trigger a 40-minute retrain.

TOY_MODEL = MODELS["toy"]["source"] if "toy" in MODELS else "resources/models/toy"


rule train_toy_model:
    output:
        directory("results/models/toy"),
    log:
        "logs/models/toy.log",
    params:
        world=config["toy"]["world"],
        train=config["toy"]["train"],
    threads: 2
    resources:
        mem_mb=8000,
        runtime=90,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/train_toy_model.py"


rule train_toy_features:
    output:
        weights="results/models/toy-features.safetensors",
        sidecar="results/models/toy-features.json",
    log:
        "logs/models/toy-features.log",
    params:
        world=config["toy"]["world"],
        features=config["toy"]["features"],
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/train_toy_features.py"


rule measure_toy_quality:
    input:
        TOY_MODEL,
    output:
        json="results/toy/quality.json",
        markdown="results/toy/quality.md",
    log:
        "logs/toy/quality.log",
    params:
        model=MODELS.get("toy"),
        n_per_prompt=64,
    threads: 2
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/measure_toy_quality.py"
