# ICM: localize and steer the implicit choices of text-to-image diffusion models.
# Usage: snakemake --cores 8 results/sd15/gender/table.csv   (see README.md)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/toy.smk"
include: "rules/generate.smk"
include: "rules/labels.smk"
include: "rules/probes.smk"
include: "rules/calibrate.smk"
include: "rules/steer.smk"
include: "rules/inject.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/head_maps.smk"


rule all:
    default_target: True
    input:
        config["targets"],
