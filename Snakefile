# ICM: localize and steer the implicit choices of text-to-image diffusion models.
# Usage: snakemake --cores 8 results/sd15/gender/table.csv   (see README.md)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/toy.smk"
include: "rules/generation.smk"
include: "rules/labeling.smk"
include: "rules/probing.smk"
include: "rules/calibration.smk"
include: "rules/steering.smk"
include: "rules/injection.smk"
include: "rules/finetuning.smk"
include: "rules/evaluation.smk"
include: "rules/head_maps.smk"


rule all:
    default_target: True
    input:
        config["targets"],
