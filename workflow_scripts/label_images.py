"""Snakemake adapter for rules label_images, label_specific_images and label_injected_images."""

from icm.jobs import end_job_process, label_images_job, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    label_images_job(sm.params.concept, sm.input.samples, sm.output.labels, sm.output.sidecar)
end_job_process()
