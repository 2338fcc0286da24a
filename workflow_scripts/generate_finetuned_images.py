"""Snakemake adapter for rule generate_finetuned_images."""

from icm.jobs import end_job_process, generate_finetuned_job, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    generate_finetuned_job(
        model_name=sm.wildcards.model, model=sm.params.model, source=sm.params.source,
        concept_name=sm.wildcards.concept, concept=sm.params.concept,
        generation=sm.params.generation, variant_name=sm.wildcards.variant,
        variant=sm.params.variant, shard=int(sm.wildcards.shard),
        adapter_dir=sm.input.adapter, training_record=sm.input.training,
        images_dir=sm.output.images, table=sm.output.samples, record=sm.output.record,
    )
end_job_process()
