"""Snakemake adapter for rule render_reference."""

from icm.jobs import end_job_process, logging_to, render_reference_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    render_reference_job(sm.params.world, sm.params.concept, sm.params.n, sm.params.seed,
                         sm.output[0])
end_job_process()
