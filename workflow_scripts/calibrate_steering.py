"""Snakemake adapter for rule calibrate_steering."""

from icm.jobs import calibrate_variant_job, end_job_process, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    calibrate_variant_job(
        model_name=sm.wildcards.model,
        model=sm.params.model,
        source=sm.params.source,
        concept={**sm.params.concept, **sm.params.labels},
        generation=sm.params.generation,
        variant_name=sm.wildcards.variant,
        variant=sm.params.variant,
        calibration=sm.params.calibration,
        toy=sm.params.toy,
        toy_features=sm.input.get("toy_features"),
        evaluation=sm.params.evaluation,
        ranking=sm.input.get("ranking"),
        pair_ranking=sm.input.get("pair_ranking"),
        directions=list(sm.input.directions),
        directions_meta=list(sm.input.directions_meta),
        start=sm.input.start,
        unsteered=sm.input.unsteered,
        unsteered_embeddings=sm.input.unsteered_embeddings,
        output=sm.output.sweep,
        output_alpha=sm.output.alpha,
        fid_reference=sm.params.fid_reference,
    )
end_job_process()
