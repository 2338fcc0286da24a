"""What produced an artifact: package versions and the settings it was made with."""

from __future__ import annotations

import platform
from importlib import metadata

TRACKED = ("icm", "torch", "diffusers", "transformers", "zarr", "numpy", "scikit-learn")


def package_versions(names: tuple[str, ...] = TRACKED) -> dict[str, str]:
    """Installed versions of the packages that shape results (``"missing"`` if absent)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions
