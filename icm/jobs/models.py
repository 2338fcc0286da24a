"""Job of stage 0: build a model the workflow makes (the tiny random-weight replicas)."""

from __future__ import annotations

import sys
from pathlib import Path


def build_model_job(builder: str, output: str | Path, seed: int = 0) -> None:
    """Build a model that the workflow makes itself instead of downloading: a tiny
    random-weight replica of a family (``tiny-sd15``, ``tiny-sdxl``, ``tiny-sana``,
    ``tiny-flux``)."""
    from icm.models.tiny import save_replica, save_tiny_sd15
    from icm.models.tiny_flux import build_tiny_flux
    from icm.models.tiny_sana import build_tiny_sana
    from icm.models.tiny_sdxl import build_tiny_sdxl

    builders = {"tiny-sdxl": build_tiny_sdxl, "tiny-sana": build_tiny_sana,
                "tiny-flux": build_tiny_flux}
    if builder == "tiny-sd15":
        save_tiny_sd15(Path(output), seed=seed)
    elif builder in builders:
        save_replica(builders[builder], Path(output), seed=seed)
    else:
        raise ValueError(f"unknown model builder {builder!r}; known: "
                         f"{sorted([*builders, 'tiny-sd15'])}")
    print(f"built {builder} into {output}", file=sys.stderr)
