"""Small writers shared by the jobs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write a JSON record (indented; values JSON cannot hold are written as strings)."""
    Path(path).write_text(json.dumps(data, indent=2, default=str))
