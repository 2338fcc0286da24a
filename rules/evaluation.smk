# Stage 5: score every variant (FD, FID, CLIP-I, CLIP-T), then the table, its plot and the
# image grid. CLIP-I compares each image with the original variant's image of the same seed.

rule render_reference:
    output:
        directory("results/{model}/{concept}/reference/images"),
    log:
        "logs/{model}/{concept}/reference.log",
    params:
        world=config["toy"]["world"],
        concept=concept_params("classes", "labeler", "reference"),
        n=1000,
        seed=12345,
        code=job_code("render_reference_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/render_reference.py"


rule compute_fid_statistics:
    input:
        unpack(fid_statistics_inputs),
    output:
        "results/{model}/{concept}/reference/fid_statistics.npz",
    log:
        "logs/{model}/{concept}/reference/fid_statistics.log",
    params:
        folder=fid_source,
        backend=lambda wildcards: "toy" if is_toy(wildcards) else "inception",
        device=config["evaluation"]["device"],
        code=job_code("fid_statistics_job"),
    threads: model_threads
    resources:
        gpu=lambda wildcards: metrics_gpu(wildcards),
        slurm_partition=lambda wildcards: partition(metrics_gpu(wildcards)),
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/compute_fid_statistics.py"


rule compute_metrics:
    input:
        unpack(metric_inputs),
    output:
        metrics="results/{model}/{concept}/metrics/{variant}.json",
        labels="results/{model}/{concept}/metrics/{variant}.labels.csv",
        embeddings="results/{model}/{concept}/metrics/{variant}.embeddings.safetensors",
    log:
        "logs/{model}/{concept}/metrics/{variant}.log",
    params:
        toy=is_toy,
        concept=concept_params("classes", "prompts", "labeler", "evaluation", "reference"),
        evaluation=metric_settings,
        fid_reference=fid_reference,
        code=job_code("compute_metrics_job"),
    wildcard_constraints:
        variant="|".join(map(re.escape, VARIANTS)) or "NO_VARIANTS",
    threads: model_threads
    resources:
        gpu=metrics_gpu,
        runtime=planned_runtime("compute_metrics"),
        slurm_partition=lambda wildcards: partition(metrics_gpu(wildcards)),
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/compute_metrics.py"


rule collect_table:
    input:
        metrics=variant_files("results/{model}/{concept}/metrics/{variant}.json"),
        records=variant_files(
            "results/{model}/{concept}/steer/{variant}/shard-000/steering.json"),
        grid="results/{model}/{concept}/grid.png",  # asking for the table builds the grid
        tradeoff=lambda wildcards: [f"results/{wildcards.model}/{wildcards.concept}/"
                                    "calibration/tradeoff.png"] if calibrated_variants(
                                        wildcards) else [],  # ... and the calibration plot
        targets=lambda wildcards: [f"results/{wildcards.model}/{wildcards.concept}/"
                                   f"target-{c}/table.csv" for c in target_classes(wildcards)]
                                   if ORIGINAL else [],  # ... and the one-target tables
    output:
        table="results/{model}/{concept}/table.csv",
        plot=report(
            "results/{model}/{concept}/metrics.png",
            category="steering",
            caption="../docs/report/metrics.rst",
        ),
    log:
        "logs/{model}/{concept}/table.log",
    params:
        code=job_code("collect_table_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/collect_table.py"


rule tabulate_target:
    input:
        labels=target_variant_files("results/{model}/{concept}/metrics/{variant}.labels.csv"),
        metrics=target_variant_files("results/{model}/{concept}/metrics/{variant}.json"),
        records=target_variant_files(
            "results/{model}/{concept}/steer/{variant}/shard-000/steering.json"),
    output:
        "results/{model}/{concept}/target-{target}/table.csv",
    log:
        "logs/{model}/{concept}/target-{target}.log",
    params:
        original=ORIGINAL,
        variants=target_variants,
        code=job_code("target_table_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/tabulate_target.py"


rule plot_grid:
    input:
        unpack(
            lambda wildcards: {
                variant: steer_files("samples.csv", variant)(wildcards)
                for variant in run_variants(wildcards)
            }
        ),
    output:
        report(
            "results/{model}/{concept}/grid.png",
            category="steering",
            caption="../docs/report/grid.rst",
        ),
    log:
        "logs/{model}/{concept}/grid.log",
    params:
        columns=config["evaluation"]["grid_columns"],
        code=job_code("plot_grid_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/plot_grid.py"
