# Stage 4a: how hard each variant pushes. Variants with `alpha: auto` are swept over
# `steering.calibration.alphas` on calibration-stream samples (seeds disjoint from the
# evaluation's); each keeps the lowest-FD alpha whose CLIP-I stays above the floor, in a file
# of its own. plot_tradeoff draws them all (table.csv asks for it).

rule calibrate_unsteered:
    input:
        unpack(lambda wildcards: scoring_inputs(
            wildcards, fid=config["steering"]["calibration"]["fid"])),
        model=model_input,
    output:
        row="results/{model}/{concept}/calibration/unsteered.csv",
        embeddings="results/{model}/{concept}/calibration/unsteered.safetensors",
    log:
        "logs/{model}/{concept}/calibration/unsteered.log",
    params:
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        concept=steer_concept,
        generation={k: config["generation"][k] for k in ("base_seed", "device")},
        # what the samples depend on: not the alphas, the floor or the ratio (a sweep's)
        calibration={k: config["steering"]["calibration"][k]
                     for k in ("batches_per_class", "batch_size")},
        fid_reference=lambda wildcards: fid_reference(wildcards)
        if config["steering"]["calibration"]["fid"] else None,
        toy=is_toy,
        evaluation=metric_settings,
        labels=concept_params("labeler", "evaluation", "reference"),
        code=job_code("calibrate_unsteered_job"),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=planned_runtime("calibrate_unsteered"),
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/calibrate_unsteered.py"


rule calibrate_steering:
    input:
        # what steering reads, but the alphas (which this rule decides)
        unpack(lambda wildcards: {k: v for k, v in steer_inputs(wildcards).items()
                                  if k != "alphas"}),
        unpack(lambda wildcards: scoring_inputs(
            wildcards, fid=config["steering"]["calibration"]["fid"])),
        model=model_input,
        unsteered="results/{model}/{concept}/calibration/unsteered.csv",
        unsteered_embeddings="results/{model}/{concept}/calibration/unsteered.safetensors",
    output:
        sweep="results/{model}/{concept}/calibration/{variant}.csv",
        alpha="results/{model}/{concept}/calibration/{variant}.alpha.json",
    log:
        "logs/{model}/{concept}/calibration/{variant}.log",
    params:
        model=model_params,
        source=lambda wildcards: model_source(wildcards.model),
        concept=steer_concept,
        generation={k: config["generation"][k] for k in ("base_seed", "device")},
        variant=lambda wildcards: {k: v for k, v in variant_spec(wildcards).items()
                                   if k != "alpha"},
        calibration=config["steering"]["calibration"],
        fid_reference=lambda wildcards: fid_reference(wildcards)
        if config["steering"]["calibration"]["fid"] else None,
        toy=is_toy,
        evaluation=metric_settings,
        labels=concept_params("labeler", "evaluation", "reference"),
        code=job_code("calibrate_variant_job"),
    wildcard_constraints:
        variant=variant_pattern(STEER_VARIANTS),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,
        runtime=planned_runtime("calibrate_steering"),
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/calibrate_steering.py"


rule plot_tradeoff:
    input:
        sweeps=lambda wildcards: [
            f"results/{wildcards.model}/{wildcards.concept}/calibration/{v}.csv"
            for v in calibrated_variants(wildcards)],
        alphas=lambda wildcards: [
            f"results/{wildcards.model}/{wildcards.concept}/calibration/{v}.alpha.json"
            for v in calibrated_variants(wildcards)],
    output:
        table="results/{model}/{concept}/calibration/tradeoff.csv",
        plot=report(
            "results/{model}/{concept}/calibration/tradeoff.png",
            category="steering",
            caption="../docs/report/tradeoff.rst",
        ),
    log:
        "logs/{model}/{concept}/calibration/tradeoff.log",
    params:
        calibration={k: config["steering"]["calibration"][k]
                     for k in ("clip_i_floor", "clip_i_scale")},
        code=job_code("tradeoff_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/plot_tradeoff.py"
