# Stage 1: generate images from the concept's general prompts while capturing the
# token-mean output of every attn1/attn2 site at every step (conditional CFG half).
# One job per shard, so many GPU jobs run side by side; each writes its own Zarr store.


rule generate_images:
    input:
        model=model_input,
    output:
        images=directory("results/{model}/{concept}/generation/shard-{shard}/images"),
        samples="results/{model}/{concept}/generation/shard-{shard}/samples.csv",
        store=directory("results/{model}/{concept}/generation/shard-{shard}/activations.zarr"),
    log:
        "logs/{model}/{concept}/generation/shard-{shard}.log",
    params:
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        concept=concept_params("prompts", "samples_per_prompt"),
        generation=config["generation"],
        code=job_code("generate_shard_job"),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=planned_runtime("generate_images"),
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/generate_images.py"


rule merge_samples:
    input:
        shard_files("results/{model}/{concept}/generation/shard-{shard}/samples.csv"),
    output:
        "results/{model}/{concept}/generation/samples.csv",
    log:
        "logs/{model}/{concept}/generation/samples.log",
    params:
        code=job_code("merge_samples_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/merge_samples.py"


# The concept's class-specific prompts (`specific_prompts`, e.g. "a photo of a woman"),
# generated and captured as the general ones, seeded apart from them: the explicit side of
# explicit_vs_implicit.csv and the data of `directions: specific` steering.
SPECIFIC = "results/{model}/{concept}/specific"


rule generate_specific_images:
    input:
        model=model_input,
    output:
        images=directory(f"{SPECIFIC}/generation/shard-{{shard}}/images"),
        samples=f"{SPECIFIC}/generation/shard-{{shard}}/samples.csv",
        store=directory(f"{SPECIFIC}/generation/shard-{{shard}}/activations.zarr"),
    log:
        "logs/{model}/{concept}/specific/generation/shard-{shard}.log",
    params:
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        concept=concept_params("specific_prompts", "specific_samples_per_prompt"),
        generation=config["generation"],
        prompt_set="specific",
        code=job_code("generate_shard_job"),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=planned_runtime("generate_specific_images"),
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/generate_images.py"


rule merge_specific_samples:
    input:
        shard_files(f"{SPECIFIC}/generation/shard-{{shard}}/samples.csv"),
    output:
        f"{SPECIFIC}/generation/samples.csv",
    log:
        "logs/{model}/{concept}/specific/generation/samples.log",
    params:
        code=job_code("merge_samples_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/merge_samples.py"
