"""Snakemake adapter for rule calibrate_unsteered."""

from icm.jobs import calibrate_unsteered_job, end_job_process, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    calibrate_unsteered_job(
        model_name=sm.wildcards.model,
        model=sm.params.model,
        source=sm.params.source,
        concept={**sm.params.concept, **sm.params.labels},
        generation=sm.params.generation,
        calibration=sm.params.calibration,
        toy=sm.params.toy,
        toy_features=sm.input.get("toy_features"),
        evaluation=sm.params.evaluation,
        output=sm.output.row,
        output_embeddings=sm.output.embeddings,
        fid_reference=sm.params.fid_reference,
    )
end_job_process()
