"""Small writers shared by the jobs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write a JSON record (indented; values JSON cannot hold are written as strings),
    atomically: a temporary file, then a rename."""
    with written(path) as partial:
        partial.write_text(json.dumps(data, indent=2, default=str))


@contextlib.contextmanager
def written(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that go by it still do) to
    write; renamed to ``path`` on success, removed on error."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        partial.rename(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
