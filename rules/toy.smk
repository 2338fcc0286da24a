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
        code=job_code("train_toy_job"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=90,
        slurm_partition=partition(0),
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
        code=job_code("train_toy_features_job"),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        slurm_partition=partition(0),
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/train_toy_features.py"


rule measure_toy_quality:
    input:
        model=TOY_MODEL,
        files=local_files(TOY_MODEL),  # a replaced weight or config file reruns it
    output:
        json="results/toy/quality.json",
        markdown="results/toy/quality.md",
    log:
        "logs/toy/quality.log",
    params:
        model={k: v for k, v in MODELS["toy"].items() if k != "resources"} if "toy" in MODELS
        else None,
        n_per_prompt=64,
        code=job_code("toy_quality_job"),
    threads: 2
    resources:
        slurm_partition=partition(0),
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/measure_toy_quality.py"
