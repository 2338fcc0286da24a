"""Snakemake adapter for rule collect_table."""

from icm.jobs import collect_table_job, end_job_process, logging_to

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    collect_table_job(list(sm.input.metrics), list(sm.input.records), sm.output.table,
                      sm.output.plot)
end_job_process()
