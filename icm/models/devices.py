"""Where a job computes: a module of its own so that jobs that load no pipeline (probes,
labels, metrics) need not import diffusers to ask for the GPU."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` means the GPU when there is one."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
