"""Snakemake adapter for rule rank_injection."""

from icm.jobs import end_job_process, logging_to, rank_injection_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    rank_injection_job(sm.input.samples, sm.input.labels, sm.input.ranking, sm.output.flips,
                       sm.output.ranking, sm.output.record, sm.output.plot)
end_job_process()
