# The toy world's models: trained from scratch by these rules, committed under resources/ so
# that the demo does not retrain. `make toy-model` forces a retrain (about 40 min on 2 cores).

TOY_MODEL = MODELS["toy"]["source"] if "toy" in MODELS else "resources/models/toy"
TOY_FEATURES = config["toy"]["features"]["path"]


rule train_toy_model:
    output:
        directory(TOY_MODEL),
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
        weights=TOY_FEATURES,
        sidecar=str(Path(TOY_FEATURES).with_suffix(".json")),
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
