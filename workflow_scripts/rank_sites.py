"""Snakemake adapter for rule rank_sites."""

from icm.jobs import end_job_process, logging_to, rank_sites_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    rank_sites_job(sm.params.probes, sm.params.k, list(sm.input), sm.output.ranking,
                   sm.output.by_pair, sm.output.by_kind, sm.output.heatmap, sm.output.start)
end_job_process()
