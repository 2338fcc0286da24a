"""Snakemake adapter for rule compute_metrics."""

from icm.jobs import compute_metrics_job, end_job_process, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    compute_metrics_job(
        toy=sm.params.toy,
        concept=sm.params.concept,
        evaluation=sm.params.evaluation,
        variant=sm.wildcards.variant,
        steered=list(sm.input.steered),
        original_embeddings=sm.input.get("original_embeddings"),
        fid_reference=sm.params.fid_reference,
        toy_features=sm.input.get("toy_features"),
        output=sm.output.metrics,
        output_labels=sm.output.labels,
        output_embeddings=sm.output.embeddings,
    )
end_job_process()
