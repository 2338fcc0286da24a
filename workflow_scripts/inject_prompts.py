"""Snakemake adapter for rule inject_prompts."""

from icm.jobs import end_job_process, inject_prompts_job, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    inject_prompts_job(
        model_name=sm.wildcards.model, model=sm.params.model, source=sm.params.source,
        concept_name=sm.wildcards.concept, concept=sm.params.concept,
        generation=sm.params.generation, images_dir=sm.output.images,
        table=sm.output.samples, record=sm.output.record,
    )
end_job_process()
