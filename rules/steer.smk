# Stage 4: debiasing generation, one job per (layer-selection variant, shard). Each batch
# gets a target class; variants differ only in which sites they steer and how hard, and all
# use the same evaluation seeds (a stream disjoint from the localization samples), so images
# compare pairwise across variants.

rule steer_images:
    input:
        unpack(steer_rankings),
        model=model_input,
        directions=pair_files("results/{model}/{concept}/probes/{pair}/directions.safetensors"),
        directions_meta=pair_files("results/{model}/{concept}/probes/{pair}/directions.json"),
    output:
        images=directory("results/{model}/{concept}/steer/{variant}/shard-{shard}/images"),
        samples="results/{model}/{concept}/steer/{variant}/shard-{shard}/samples.csv",
        record="results/{model}/{concept}/steer/{variant}/shard-{shard}/steering.json",
    log:
        "logs/{model}/{concept}/steer/{variant}/shard-{shard}.log",
    params:
        model=lambda wildcards: MODELS[wildcards.model],
        source=lambda wildcards: model_source(wildcards.model),
        concept=steer_concept,
        generation=config["generation"],
        probes=config["probes"],
        variant=variant_spec,
    wildcard_constraints:
        variant="|".join(map(re.escape, VARIANTS)) or "NO_VARIANTS",
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=runtime_resources,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/steer_images.py"
