# Stage 4b: ICM finetuning (the paper's section 3.2, appendix C). A `method: lora` variant
# trains a LoRA on its sites (chosen as the steering variants choose theirs; per pair, the
# union of the pairs' sites, as the paper's race LoRA) from the class-specific prompts' images reported under general prompts, then
# generates the steering variants' evaluation samples with it, into the same steer/ paths,
# so metrics and table.csv take its rows beside theirs.
FINETUNE = "results/{model}/{concept}/finetune/{variant}"
SPECIFIC_GENERATION = "results/{model}/{concept}/specific/generation"


rule finetune_lora:
    input:
        unpack(lambda wildcards: {"ranking": "results/{model}/{concept}/ranking.csv"}
               if config["steering"]["sites_per"] == "concept"
               else {"pair_ranking": "results/{model}/{concept}/ranking_by_pair.csv"}),
        samples=f"{SPECIFIC_GENERATION}/samples.csv",
        labels="results/{model}/{concept}/specific/labels.csv",
        images=shard_files(f"{SPECIFIC_GENERATION}/shard-{{shard}}/images"),
        model=model_input,
    output:
        adapter=directory(f"{FINETUNE}/adapter"),
        record=f"{FINETUNE}/training.json",
        losses=f"{FINETUNE}/losses.csv",
        plot=f"{FINETUNE}/loss.png",
    log:
        "logs/{model}/{concept}/finetune/{variant}.log",
    params:
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        concept=lambda wildcards: concept_params("prompts", "classes", "reference")(wildcards)
        | {"pairs": [list(p) for p in concept_pairs(wildcards.concept)]},
        variant=variant_spec,
        finetuning=finetune_settings,
        generation={k: config["generation"][k] for k in ("device",)},
        code=job_code("finetune_lora_job"),
    wildcard_constraints:
        variant=variant_pattern(LORA_VARIANTS),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=planned_runtime("finetune_lora"),
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/finetune_lora.py"


rule generate_finetuned_images:
    input:
        adapter=f"{FINETUNE}/adapter",
        training=f"{FINETUNE}/training.json",
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
        code=job_code("generate_finetuned_job"),
    wildcard_constraints:
        variant=variant_pattern(LORA_VARIANTS),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=planned_runtime("generate_finetuned_images"),
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/generate_finetuned_images.py"
