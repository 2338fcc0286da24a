"""Snakemake adapter for rule merge_probes."""

from icm.jobs import end_job_process, logging_to, merge_probes_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    merge_probes_job(list(zip(sm.input.scores, sm.input.directions, sm.input.meta, strict=True)),
                     sm.output.scores, sm.output.directions, sm.output.meta,
                     sm.output.heatmap)
end_job_process()
