"""Snakemake adapter for rules generate_images and generate_specific_images."""

from icm.jobs import end_job_process, generate_shard_job, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    generate_shard_job(
        model_name=sm.wildcards.model,
        model=sm.params.model,
        source=sm.params.source,
        concept_name=sm.wildcards.concept,
        concept=sm.params.concept,
        generation=sm.params.generation,
        shard=int(sm.wildcards.shard),
        images_dir=sm.output.images,
        table=sm.output.samples,
        store=sm.output.store,
        prompt_set=sm.params.get("prompt_set", "general"),
    )
end_job_process()
