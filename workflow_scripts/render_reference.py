"""Snakemake adapter for rule render_reference."""

from icm.jobs import logging_to, render_reference_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    render_reference_job(sm.params.world, sm.params.concept, sm.params.n, sm.params.seed,
                         sm.output[0])
