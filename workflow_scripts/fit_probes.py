"""Snakemake adapter for rules fit_probes, fit_probe_group and fit_specific_probes."""

from icm.jobs import end_job_process, fit_probes_job, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    fit_probes_job(sm.params.concept, sm.params.probes, sm.params.pair, sm.input.labels,
                   list(sm.input.stores), sm.output.scores, sm.output.directions,
                   sm.output.meta, sm.output.get("heatmap"),
                   memory_mb=0.5 * sm.resources.get("mem_mb", 4000),  # half the job's
                   group=sm.params.group, by_prompt=sm.params.get("by_prompt", False))
end_job_process()
