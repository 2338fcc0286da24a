"""Snakemake adapter for rule train_toy_features."""

from icm.jobs import end_job_process, logging_to, train_toy_features_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    train_toy_features_job(sm.params.world, sm.params.features, sm.output.weights,
                           threads=sm.threads)
end_job_process()
