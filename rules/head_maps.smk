# The head-map study of a concept (`concepts.<c>.head_maps`, docs/head-maps.md): per-head
# cross-attention word maps captured while generating the study's fully specified prompts,
# head relevance fitted on the train prompts, DAAM's all-head maps and selections of heads
# judged against masks on held-out prompts. Each job's params hold only the study keys it
# uses, so editing `taus` or `ks` reruns the evaluation and the plots, nothing else.

# The study helpers (HEAD_MAPS, the key sets, study(), mask_files() ...) are in common.smk.

rule capture_head_maps:
    input:
        model=model_input,
    output:
        images=directory(f"{HEAD_MAPS}/held-out/shard-{{shard}}/images"),
        samples=f"{HEAD_MAPS}/held-out/shard-{{shard}}/samples.csv",
        store=directory(f"{HEAD_MAPS}/held-out/shard-{{shard}}/maps.zarr"),
    log:
        "logs/{model}/{concept}/head-maps/held-out/shard-{shard}.log",
    params:
        split="held-out",
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        study=study(*STUDY_KEYS, "held_out_samples_per_prompt"),
        generation={k: config["generation"][k] for k in ("base_seed", "device")},
        code=job_code("capture_head_maps_job"),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=runtime_resources,
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/capture_head_maps.py"


use rule capture_head_maps as capture_train_head_maps with:
    output:
        images=directory(f"{HEAD_MAPS}/train/shard-{{shard}}/images"),
        samples=f"{HEAD_MAPS}/train/shard-{{shard}}/samples.csv",
        store=directory(f"{HEAD_MAPS}/train/shard-{{shard}}/maps.zarr"),
        votes=f"{HEAD_MAPS}/train/shard-{{shard}}/votes.safetensors",  # HRV's, same calls
    log:
        "logs/{model}/{concept}/head-maps/train/shard-{shard}.log",
    params:
        split="train",
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        study=study(*TRAIN_KEYS),
        generation={k: config["generation"][k] for k in ("base_seed", "device")},
        code=job_code("capture_head_maps_job"),


rule count_head_votes:
    input:
        model=model_input,
    output:
        votes=f"{HEAD_MAPS}/hrv-votes/shard-{{shard}}/votes.safetensors",
    log:
        "logs/{model}/{concept}/head-maps/hrv-votes/shard-{shard}.log",
    params:
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        study=study(*HRV_VOTE_KEYS),
        generation={k: config["generation"][k] for k in ("base_seed", "device")},
        code=job_code("count_head_votes_job"),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=runtime_resources,
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/count_head_votes.py"


rule score_head_relevance:
    input:
        samples=split_files("train", "samples.csv"),
        stores=split_files("train", "maps.zarr"),
        votes=hrv_vote_files,
        images=split_files("train", "images"),
        masks=oracle_mask_files,
        hrv_vectors=lambda wildcards: [
            f for key in ("vectors", "head_index") for f in local_files(
                (CONCEPTS[wildcards.concept]["head_maps"].get("hrv_vectors") or {}).get(key))],
    output:
        table=f"{HEAD_MAPS}/relevance.csv",
        tensors=f"{HEAD_MAPS}/relevance.safetensors",
        record=f"{HEAD_MAPS}/relevance.json",
    log:
        "logs/{model}/{concept}/head-maps/relevance.log",
    params:
        study=study(*RELEVANCE_KEYS, masks_if_oracle=True),
        code=job_code("score_head_relevance_job"),
    threads: model_threads
    resources:
        mem_mb=mem_resources,
        slurm_partition=partition(0),
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/score_head_relevance.py"


rule evaluate_head_maps:
    input:
        relevance=f"{HEAD_MAPS}/relevance.csv",
        train_samples=split_files("train", "samples.csv"),
        train_stores=split_files("train", "maps.zarr"),
        held_out_samples=split_files("held-out", "samples.csv"),
        held_out_stores=split_files("held-out", "maps.zarr"),
        images=lambda wildcards: split_files("train", "images")(wildcards)
        + split_files("held-out", "images")(wildcards),
        masks=mask_files,
    output:
        table=f"{HEAD_MAPS}/table.csv",
        curve=f"{HEAD_MAPS}/curve.csv",
        record=f"{HEAD_MAPS}/table.json",
    log:
        "logs/{model}/{concept}/head-maps/table.log",
    params:
        study=study(*EVALUATION_KEYS),
        code=job_code("evaluate_head_maps_job"),
    threads: model_threads
    resources:
        mem_mb=mem_resources,
        slurm_partition=partition(0),
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/evaluate_head_maps.py"


rule plot_head_maps:
    input:
        table=f"{HEAD_MAPS}/table.csv",
        curve=f"{HEAD_MAPS}/curve.csv",
        relevance=f"{HEAD_MAPS}/relevance.csv",
        samples=split_files("held-out", "samples.csv"),
        stores=split_files("held-out", "maps.zarr"),
        images=split_files("held-out", "images"),
        masks=mask_files,
    output:
        curve=report(f"{HEAD_MAPS}/curve.png", category="head maps",
                     caption="../docs/report/head-curve.rst"),
        tau=report(f"{HEAD_MAPS}/tau.png", category="head maps",
                   caption="../docs/report/head-tau.rst"),
        overlays=report(f"{HEAD_MAPS}/overlays.png", category="head maps",
                        caption="../docs/report/head-overlays.rst"),
        relevance=report(f"{HEAD_MAPS}/relevance.png", category="head maps",
                         caption="../docs/report/head-relevance.rst"),
        misread=f"{HEAD_MAPS}/misread.csv",
        misread_plot=report(f"{HEAD_MAPS}/misread.png", category="head maps",
                            caption="../docs/report/head-misread.rst"),
    log:
        "logs/{model}/{concept}/head-maps/plots.log",
    params:
        study=study(*EVALUATION_KEYS),
        code=job_code("plot_head_maps_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/plot_head_maps.py"
