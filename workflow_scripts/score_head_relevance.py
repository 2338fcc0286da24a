"""Snakemake adapter for rule score_head_relevance."""

from icm.jobs import end_job_process, logging_to, score_head_relevance_job, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    score_head_relevance_job(
        study=sm.params.study,
        tables=sm.input.samples,
        stores=sm.input.stores,
        votes=sm.input.votes,
        output_table=sm.output.table,
        output_tensors=sm.output.tensors,
        output_record=sm.output.record,
    )
end_job_process()
