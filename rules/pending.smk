# Stages 4-5, declared so that the whole DAG plans (`snakemake -n .../table.csv`) but NOT
# implemented yet: each job stops at once with the issue that will implement it. As a stage
# lands it moves to its own rules/<stage>.smk with a real script.

PLANNED_VARIANTS = ["original", "icm", "cross", "all", "random", "worst"]


rule steer_images:
    input:
        model=model_input,
        ranking="results/{model}/{concept}/ranking.csv",
        directions=pair_files("results/{model}/{concept}/probes/{pair}/directions.safetensors"),
    output:
        "results/{model}/{concept}/steer/{variant}/shard-{shard}/samples.csv",
    log:
        "logs/{model}/{concept}/steer/{variant}/shard-{shard}.log",
    params:
        stage="steering (issue 5)",
    wildcard_constraints:
        variant="|".join(PLANNED_VARIANTS),
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=runtime_resources,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/pending_stage.py"


rule compute_metrics:
    input:
        shard_files("results/{model}/{concept}/steer/{variant}/shard-{shard}/samples.csv"),
    output:
        "results/{model}/{concept}/metrics/{variant}.json",
    log:
        "logs/{model}/{concept}/metrics/{variant}.log",
    params:
        stage="metrics (issue 5)",
    resources:
        gpu=gpu_resources,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/pending_stage.py"


rule collect_table:
    input:
        expand("results/{{model}}/{{concept}}/metrics/{variant}.json", variant=PLANNED_VARIANTS),
    output:
        "results/{model}/{concept}/table.csv",
    log:
        "logs/{model}/{concept}/table.log",
    params:
        stage="results table (issue 5)",
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/pending_stage.py"
