"""Snakemake adapter for rule compare_explicit_implicit."""

from icm.jobs import end_job_process, explicit_vs_implicit_job, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    explicit_vs_implicit_job(
        sm.params.concept, sm.params.probes, sm.input.labels, list(sm.input.stores),
        sm.input.specific_labels, list(sm.input.specific_stores), sm.output.table,
        sm.output.scores, sm.output.heatmap, sm.output.record,
        memory_mb=0.5 * sm.resources.get("mem_mb", 4000),  # half the job's
    )
end_job_process()
