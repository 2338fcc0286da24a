# Prompt injection, the localization baseline (the paper's appendix H): each class's prompt
# in place of the general prompt's text at one cross-attention site, every step, on a few
# seeds per general prompt; how often it flips the image to that class ranks the sites,
# compared with the probes' ranking.
INJECTION = "results/{model}/{concept}/injection"


rule inject_prompts:
    input:
        model=model_input,
    output:
        images=directory(f"{INJECTION}/images"),
        samples=f"{INJECTION}/samples.csv",
        record=f"{INJECTION}/injection.json",
    log:
        "logs/{model}/{concept}/injection/generation.log",
    params:
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        concept=injection_concept,
        generation={k: config["generation"][k] for k in ("base_seed", "device")},
        code=job_code("inject_prompts_job"),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=runtime_resources,
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/inject_prompts.py"


rule label_injected_images:
    input:
        samples=f"{INJECTION}/samples.csv",
        images=f"{INJECTION}/images",
        checkpoints=lambda wildcards: labeler_files(CONCEPTS[wildcards.concept]["labeler"]),
    output:
        labels=f"{INJECTION}/labels.csv",
        sidecar=f"{INJECTION}/labels.json",
    log:
        "logs/{model}/{concept}/injection/labels.log",
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


rule rank_injection:
    input:
        samples=f"{INJECTION}/samples.csv",
        labels=f"{INJECTION}/labels.csv",
        ranking="results/{model}/{concept}/ranking.csv",
    output:
        flips=f"{INJECTION}/flips.csv",
        ranking=f"{INJECTION}/ranking.csv",
        record=f"{INJECTION}/correlation.json",
        plot=report(f"{INJECTION}/injection_vs_probes.png", category="probes",
                    caption="../docs/report/injection.rst"),
    log:
        "logs/{model}/{concept}/injection/ranking.log",
    params:
        code=job_code("rank_injection_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/rank_injection.py"
