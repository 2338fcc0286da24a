"""CSV tables, written atomically: a killed job never leaves a half-written table."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def write_table(
    path: str | Path, rows: Sequence[dict[str, object]], columns: Sequence[str]
) -> None:
    """Write ``rows`` under ``columns`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    tmp.rename(path)
