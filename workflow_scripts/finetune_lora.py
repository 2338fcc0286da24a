"""Snakemake adapter for rule finetune_lora."""

from icm.jobs import end_job_process, finetune_lora_job, logging_to, use_threads

sm = snakemake  # noqa: F821 (injected by Snakemake)
use_threads(sm.threads)
with logging_to(sm.log[0]):
    finetune_lora_job(
        model_name=sm.wildcards.model, model=sm.params.model, source=sm.params.source,
        concept=sm.params.concept, variant_name=sm.wildcards.variant,
        variant=sm.params.variant, finetuning=sm.params.finetuning,
        generation=sm.params.generation, ranking=sm.input.get("ranking"),
        pair_ranking=sm.input.get("pair_ranking"),
        samples_csv=sm.input.samples, labels_csv=sm.input.labels,
        adapter_dir=sm.output.adapter, record=sm.output.record,
        losses_csv=sm.output.losses, loss_plot=sm.output.plot,
    )
end_job_process()
