"""Snakemake adapter for rule count_head_votes."""

from icm.jobs import count_head_votes_job, end_job_process, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    count_head_votes_job(
        model_name=sm.wildcards.model,
        model=sm.params.model,
        source=sm.params.source,
        concept_name=sm.wildcards.concept,
        study=sm.params.study,
        generation=sm.params.generation,
        shard=int(sm.wildcards.shard),
        votes=sm.output.votes,
    )
end_job_process()
