"""Snakemake adapter for rule merge_samples."""

from icm.jobs import end_job_process, logging_to, merge_samples_job

with logging_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    merge_samples_job(list(snakemake.input), snakemake.output[0])  # noqa: F821
end_job_process()
