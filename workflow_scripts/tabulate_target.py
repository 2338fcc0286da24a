"""Snakemake adapter for rule tabulate_target."""

from icm.jobs import end_job_process, logging_to, target_table_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
variants = list(sm.params.variants)  # the order of the inputs
with logging_to(sm.log[0]):
    target_table_job(
        target=sm.wildcards.target,
        labels=dict(zip(variants, sm.input.labels, strict=True)),
        original=sm.params.original,
        records=dict(zip(variants, sm.input.records, strict=True)),
        metrics=dict(zip(variants, sm.input.metrics, strict=True)),
        output=sm.output[0],
    )
end_job_process()
