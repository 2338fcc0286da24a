"""Snakemake adapter for rule plot_tradeoff."""

from icm.jobs import end_job_process, logging_to, tradeoff_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    tradeoff_job(list(sm.input.sweeps), list(sm.input.alphas), sm.params.calibration,
                 sm.output.table, sm.output.plot)
end_job_process()
