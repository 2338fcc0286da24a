# Stage 3: a linear probe per (site, step) for each class pair, then the site ranking.


PROBES = "results/{model}/{concept}/probes/{pair}"
SITE_GROUPS = config["probes"]["site_groups"]
FIT_PARAMS = {
    "concept": concept_params("prompts", "classes"),
    "pair": pair_of,
    "probes": {k: v for k, v in config["probes"].items()
               if k not in ("steer_start", "start_level", "site_groups")},
}
FIT_RESOURCES = {
    "gpu": gpu_resources,
    "mem_mb": mem_resources,  # half of it bounds one batched fit (sites per fit)
    "slurm_partition": model_partition,
}
PAIR_OUTPUTS = {
    "scores": f"{PROBES}/scores.csv",
    "directions": f"{PROBES}/directions.safetensors",
    "meta": f"{PROBES}/directions.json",
    "heatmap": report(f"{PROBES}/heatmap.png", category="probes",
                      caption="../docs/report/probe_heatmap.rst"),
}


if SITE_GROUPS == 1:

    rule fit_probes:
        input:
            labels="results/{model}/{concept}/labels.csv",
            stores=shard_files(
                "results/{model}/{concept}/generation/shard-{shard}/activations.zarr"),
        output:
            **PAIR_OUTPUTS,
        log:
            "logs/{model}/{concept}/probes/{pair}.log",
        params:
            **FIT_PARAMS,
            group=None,
            code=job_code("fit_probes_job"),
        threads: model_threads
        resources:
            **FIT_RESOURCES,
        conda:
            "../envs/generation.yaml"
        script:
            "../workflow_scripts/fit_probes.py"

else:  # probes.site_groups jobs per pair, side by side, then one local merge

    rule fit_probe_group:
        input:
            labels="results/{model}/{concept}/labels.csv",
            stores=shard_files(
                "results/{model}/{concept}/generation/shard-{shard}/activations.zarr"),
        output:
            scores=f"{PROBES}/group-{{group}}/scores.csv",
            directions=f"{PROBES}/group-{{group}}/directions.safetensors",
            meta=f"{PROBES}/group-{{group}}/directions.json",
        log:
            "logs/{model}/{concept}/probes/{pair}/group-{group}.log",
        wildcard_constraints:
            group=r"\d{3}",
        params:
            **FIT_PARAMS,
            group=lambda wildcards: (int(wildcards.group), SITE_GROUPS),
            code=job_code("fit_probes_job"),
        threads: model_threads
        resources:
            **FIT_RESOURCES,
        conda:
            "../envs/generation.yaml"
        script:
            "../workflow_scripts/fit_probes.py"

    rule merge_probes:
        input:
            scores=[f"{PROBES}/group-{g:03d}/scores.csv" for g in range(SITE_GROUPS)],
            directions=[f"{PROBES}/group-{g:03d}/directions.safetensors"
                        for g in range(SITE_GROUPS)],
            meta=[f"{PROBES}/group-{g:03d}/directions.json" for g in range(SITE_GROUPS)],
        output:
            **PAIR_OUTPUTS,
        log:
            "logs/{model}/{concept}/probes/{pair}.log",
        params:
            code=job_code("merge_probes_job"),
        localrule: True
        conda:
            "../envs/generation.yaml"
        script:
            "../workflow_scripts/merge_probes.py"


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
        probes={"steer_start": config["probes"]["steer_start"]} | (
            {k: config["probes"][k] for k in ("start_level", "start_baseline",
                                               "start_correction")}
            | {"sites_per": config["steering"]["sites_per"]}
            if config["probes"]["steer_start"] == "auto" else {}),
        # the sites whose probes decide an automatic start (unused by a fixed one)
        k=lambda w: steering_k(w.concept) if config["probes"]["steer_start"] == "auto" else None,
        code=job_code("rank_sites_job"),
    localrule: True
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/rank_sites.py"


# The class-specific prompts (rules/generation.smk): probes of class c's prompts against
# class c''s (labels from the prompts, no prompt control: the prompt is the class), the
# directions of `directions: specific` steering (the paper's Table 4).
rule fit_specific_probes:
    input:
        labels="results/{model}/{concept}/specific/labels.csv",
        stores=shard_files(
            "results/{model}/{concept}/specific/generation/shard-{shard}/activations.zarr"),
    output:
        scores="results/{model}/{concept}/specific/probes/{pair}/scores.csv",
        directions="results/{model}/{concept}/specific/probes/{pair}/directions.safetensors",
        meta="results/{model}/{concept}/specific/probes/{pair}/directions.json",
        heatmap="results/{model}/{concept}/specific/probes/{pair}/heatmap.png",
    log:
        "logs/{model}/{concept}/specific/probes/{pair}.log",
    params:
        concept=concept_params("classes", "specific_prompts"),
        pair=pair_of,
        probes=FIT_PARAMS["probes"] | {"control": "none"},
        group=None,
        by_prompt=True,
        code=job_code("fit_probes_job"),
    threads: model_threads
    resources:
        **FIT_RESOURCES,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/fit_probes.py"


# Implicit or explicit (the paper's Table 3): per specific prompt of class c, probes telling
# its images (labelled c) from the general prompts' images labelled c, in equal numbers.
rule compare_explicit_implicit:
    input:
        labels="results/{model}/{concept}/labels.csv",
        stores=shard_files(
            "results/{model}/{concept}/generation/shard-{shard}/activations.zarr"),
        specific_labels="results/{model}/{concept}/specific/labels.csv",
        specific_stores=shard_files(
            "results/{model}/{concept}/specific/generation/shard-{shard}/activations.zarr"),
    output:
        table="results/{model}/{concept}/explicit_vs_implicit.csv",
        record="results/{model}/{concept}/explicit_vs_implicit.json",
        scores="results/{model}/{concept}/explicit-vs-implicit/scores.csv",
        heatmap=report("results/{model}/{concept}/explicit-vs-implicit/heatmap.png",
                       category="probes",
                       caption="../docs/report/explicit_vs_implicit.rst"),
    log:
        "logs/{model}/{concept}/explicit_vs_implicit.log",
    params:
        concept=concept_params("classes", "specific_prompts"),
        probes=FIT_PARAMS["probes"] | {"control": "none"},
        code=job_code("explicit_vs_implicit_job"),
    threads: model_threads
    resources:
        **FIT_RESOURCES,
    conda:
        "../envs/generation.yaml"
    script:
        "../workflow_scripts/compare_explicit_implicit.py"
