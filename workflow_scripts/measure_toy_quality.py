"""Snakemake adapter for rule measure_toy_quality."""

from icm.jobs import end_job_process, logging_to, toy_quality_job

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    toy_quality_job("toy", sm.params.model, sm.input.model, sm.output.json, sm.output.markdown,
                    n_per_prompt=sm.params.n_per_prompt, threads=sm.threads)
end_job_process()
