"""Where arrays hold NaN or inf, for the checks of stores, probes and steering (a module of
its own, so that the code fingerprints of the jobs that use it change only with it)."""

from __future__ import annotations

import numpy as np


def nonfinite_steps(values: np.ndarray, step_axis: int) -> list[int]:
    """The indices along ``step_axis`` at which ``values`` hold any NaN or inf."""
    bad = ~np.isfinite(np.asarray(values))
    others = tuple(axis for axis in range(bad.ndim) if axis != step_axis)
    return np.flatnonzero(bad.any(axis=others)).tolist()
