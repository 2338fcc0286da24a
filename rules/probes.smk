# Stage 3: a linear probe per (site, step) for each class pair, then the site ranking.


rule fit_probes:
    input:
        labels="results/{model}/{concept}/labels.csv",
        stores=shard_files("results/{model}/{concept}/generation/shard-{shard}/activations.zarr"),
    output:
        scores="results/{model}/{concept}/probes/{pair}/scores.csv",
        directions="results/{model}/{concept}/probes/{pair}/directions.safetensors",
        meta="results/{model}/{concept}/probes/{pair}/directions.json",
        heatmap=report(
            "results/{model}/{concept}/probes/{pair}/heatmap.png",
            category="probes",
            caption="../docs/report/probe_heatmap.rst",
        ),
    log:
        "logs/{model}/{concept}/probes/{pair}.log",
    params:
        concept=concept_params("prompts", "classes"),
        pair=pair_of,
        probes={k: v for k, v in config["probes"].items()
                if k not in ("steer_start", "start_level")},
        code=job_code("fit_probes_job"),
    threads: model_threads
    resources:
        gpu=gpu_resources,
        mem_mb=mem_resources,  # half of it bounds one batched fit (sites per fit)
        slurm_partition=model_partition,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/fit_probes.py"


rule rank_sites:
    input:
        pair_files("results/{model}/{concept}/probes/{pair}/scores.csv"),
    output:
        ranking="results/{model}/{concept}/ranking.csv",
        by_pair="results/{model}/{concept}/ranking_by_pair.csv",
        start="results/{model}/{concept}/ranking.json",
        by_kind="results/{model}/{concept}/ranking_by_kind.csv",
        heatmap=report(
            "results/{model}/{concept}/ranking_heatmap.png",
            category="probes",
            caption="../docs/report/ranking_heatmap.rst",
        ),
    log:
        "logs/{model}/{concept}/ranking.log",
    params:
        probes={k: config["probes"][k] for k in ("steer_start", "start_level")} | (
            {"sites_per": config["steering"]["sites_per"]}
            if config["probes"]["steer_start"] == "auto" else {}),
        # the sites whose probes decide an automatic start (unused by a fixed one)
        k=config["steering"]["k"] if config["probes"]["steer_start"] == "auto" else None,
        code=job_code("rank_sites_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/rank_sites.py"
