"""ICM: localize and steer the implicit choices of text-to-image diffusion models.

The package holds all logic; the Snakemake rules only call into it.
"""

__version__ = "0.1.0"
