# Stage 2: pseudo-label every generated image with the concept's labeler (CLIP zero-shot,
# FairFace, or the toy oracle). Missing labeler weights stop the job before any work.


rule label_images:
    input:
        samples="results/{model}/{concept}/generation/samples.csv",
        images=shard_files("results/{model}/{concept}/generation/shard-{shard}/images"),
        checkpoints=lambda wildcards: labeler_files(CONCEPTS[wildcards.concept]["labeler"]),
    output:
        labels="results/{model}/{concept}/labels.csv",
        sidecar="results/{model}/{concept}/labels.json",
    log:
        "logs/{model}/{concept}/labels.log",
    params:
        concept=concept_params("labeler", "classes"),
        code=job_code("label_images_job"),
    threads: model_threads
    resources:
        gpu=labeler_gpu,
        slurm_partition=labeler_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/label_images.py"


rule label_specific_images:
    input:
        samples="results/{model}/{concept}/specific/generation/samples.csv",
        images=shard_files(
            "results/{model}/{concept}/specific/generation/shard-{shard}/images"),
        checkpoints=lambda wildcards: labeler_files(CONCEPTS[wildcards.concept]["labeler"]),
    output:
        labels="results/{model}/{concept}/specific/labels.csv",
        sidecar="results/{model}/{concept}/specific/labels.json",
    log:
        "logs/{model}/{concept}/specific/labels.log",
    params:
        concept=concept_params("labeler", "classes", "specific_prompts"),
        code=job_code("label_images_job"),
    threads: model_threads
    resources:
        gpu=labeler_gpu,
        slurm_partition=labeler_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/label_images.py"
