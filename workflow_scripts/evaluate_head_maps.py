"""Snakemake adapter for rule evaluate_head_maps."""

from icm.jobs import end_job_process, evaluate_head_maps_job, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    evaluate_head_maps_job(
        study=sm.params.study,
        splits={"train": (sm.input.train_samples, sm.input.train_stores),
                "held-out": (sm.input.held_out_samples, sm.input.held_out_stores)},
        relevance=sm.input.relevance,
        output_table=sm.output.table,
        output_curve=sm.output.curve,
        output_record=sm.output.record,
    )
end_job_process()
