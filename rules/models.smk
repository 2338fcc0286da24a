# Stage 0: models the workflow builds itself (offline replicas; real weights are loaded
# from their hub id or local folder by the jobs that need them).


rule build_model:
    output:
        directory("results/models/{built_model}"),
    log:
        "logs/models/{built_model}.log",
    params:
        builder=lambda wildcards: MODELS[wildcards.built_model]["builder"],
        code=job_code("build_model_job"),
    resources:
        slurm_partition=partition(0),
    wildcard_constraints:
        built_model="|".join(re.escape(m) for m, c in MODELS.items() if c["builder"])
        or "NO_BUILT_MODELS",
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/build_model.py"
