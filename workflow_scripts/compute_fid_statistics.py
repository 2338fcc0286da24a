"""Snakemake adapter for rule compute_fid_statistics."""

from icm.jobs import end_job_process, fid_statistics_job, logging_to

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logging_to(sm.log[0]):
    fid_statistics_job(folder=sm.params.folder, backend=sm.params.backend,
                       toy_features=sm.input.get("toy_features"), device=sm.params.device,
                       output=sm.output[0])
end_job_process()
