"""Snakemake adapter for rule build_model."""

from icm.jobs import build_model_job, end_job_process, logging_to

with logging_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    build_model_job(snakemake.params.builder, snakemake.output[0])  # noqa: F821
end_job_process()
