# Stage 4: debiasing generation, one job per (layer-selection variant, shard). Each batch
# gets a target class; variants differ only in which sites they steer and how hard, and all
# use the same evaluation seeds (a stream disjoint from the localization samples), so images
# compare pairwise across variants.

rule steer_images:
    input:
        unpack(steer_inputs),
        model=model_input,
    output:
        images=directory("results/{model}/{concept}/steer/{variant}/shard-{shard}/images"),
        samples="results/{model}/{concept}/steer/{variant}/shard-{shard}/samples.csv",
        record="results/{model}/{concept}/steer/{variant}/shard-{shard}/steering.json",
    log:
        "logs/{model}/{concept}/steer/{variant}/shard-{shard}.log",
    params:
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        concept=steer_concept,
        generation={k: config["generation"][k] for k in ("base_seed", "device")},
        variant=variant_spec,
        code=job_code("steer_shard_job"),
    wildcard_constraints:
        variant=variant_pattern(STEER_VARIANTS),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=planned_runtime("steer_images"),
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/steer_images.py"
