"""Snakemake adapter for rules capture_head_maps and capture_train_head_maps."""

from icm.jobs import capture_head_maps_job, end_job_process, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    capture_head_maps_job(
        model_name=sm.wildcards.model,
        model=sm.params.model,
        source=sm.params.source,
        concept_name=sm.wildcards.concept,
        study=sm.params.study,
        generation=sm.params.generation,
        split=sm.params.split,
        shard=int(sm.wildcards.shard),
        images_dir=sm.output.images,
        table=sm.output.samples,
        store=sm.output.store,
        votes=sm.output.get("votes"),
    )
end_job_process()
