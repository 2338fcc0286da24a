"""Snakemake adapter for rule steer_images."""

from icm.jobs import end_job_process, logging_to, steer_shard_job, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    steer_shard_job(
        model_name=sm.wildcards.model,
        model=sm.params.model,
        source=sm.params.source,
        concept_name=sm.wildcards.concept,
        concept=sm.params.concept,
        generation=sm.params.generation,
        variant_name=sm.wildcards.variant,
        variant=sm.params.variant,
        shard=int(sm.wildcards.shard),
        ranking=sm.input.get("ranking"),
        pair_ranking=sm.input.get("pair_ranking"),
        directions=list(sm.input.get("directions", [])),
        directions_meta=list(sm.input.get("directions_meta", [])),
        start=sm.input.get("start"),
        alphas=sm.input.get("alphas"),
        images_dir=sm.output.images,
        table=sm.output.samples,
        record=sm.output.record,
    )
end_job_process()
