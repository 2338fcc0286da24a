"""Atomic writes: every output appears complete under its final name, or not at all.

Snakemake trusts any output that exists, so a job killed halfway must leave nothing at the
final path. Each writer fills a temporary name beside the target and renames it, which is
atomic within one folder; on error the temporary is removed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
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


@contextlib.contextmanager
def written(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that go by it still do) to
    write; renamed to ``path`` on success, removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        partial.rename(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_table(
    path: str | Path, rows: Sequence[dict[str, object]], columns: Sequence[str]
) -> None:
    """Write ``rows`` under ``columns`` as CSV, atomically."""
    with written(path) as partial, partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write a JSON record (indented; values JSON cannot hold are written as strings),
    atomically."""
    with written(path) as partial:
        partial.write_text(json.dumps(data, indent=2, default=str))
