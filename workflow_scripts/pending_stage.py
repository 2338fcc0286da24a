"""Adapter for stages that are declared in the DAG but not implemented yet: fail clearly."""

raise NotImplementedError(
    f"stage {snakemake.params.stage} is not implemented yet; "  # noqa: F821
    f"rule {snakemake.rule} cannot build {list(snakemake.output)}"  # noqa: F821
)
