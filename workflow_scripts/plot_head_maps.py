"""Snakemake adapter for rule plot_head_maps."""

from icm.jobs import end_job_process, logging_to, plot_head_maps_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    plot_head_maps_job(
        study=sm.params.study,
        table=sm.input.table,
        curve=sm.input.curve,
        relevance=sm.input.relevance,
        held_out=(sm.input.samples, sm.input.stores),
        outputs=dict(sm.output.items()),
    )
end_job_process()
