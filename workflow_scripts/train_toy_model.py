"""Snakemake adapter for rule train_toy_model."""

from icm.jobs import end_job_process, logging_to, train_toy_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    train_toy_job(sm.params.world, sm.params.train, sm.output[0], threads=sm.threads)
end_job_process()
