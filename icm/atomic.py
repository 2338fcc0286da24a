"""Write a directory under a temporary name and move it into place only on success.

Snakemake trusts any output that exists, so a job killed halfway must leave nothing at the
final path; a rename within one folder is atomic.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield ``<path>.partial`` (not yet created) to fill; rename it to ``path`` on success.

    On any error the partial directory is removed. An existing ``path`` is an error unless
    ``replace`` is set, in which case it is swapped out only once the new one is complete.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; remove it to rebuild")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
