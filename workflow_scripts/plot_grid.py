"""Snakemake adapter for rule plot_grid."""

from icm.jobs import end_job_process, logging_to, plot_grid_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    tables = {name: list(files) for name, files in sm.input.items()}
    plot_grid_job(tables, sm.params.columns, sm.output[0])
end_job_process()
