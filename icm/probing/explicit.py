"""Implicit or explicit: do the activations of a class the model chose on its own look like
those of the same class asked for by name? (The paper's section 4.5 and Table 3.)

For each specific prompt of class c (``concepts.<c>.specific_prompts``), a probe per (site,
step) tells its images from the general prompts' images of class c, both sides labelled c
by the concept's labeler (a specific-prompt image the labeler reads as another class is left
out, and counted), in equal numbers (the larger side subsampled, seeded), so chance is 50 %.
Accuracy well above it means a choice left to the model is represented differently from
the same content requested explicitly, so that prompt injection, which localizes the
explicit case, need not localize the implicit one.

The best (site, step) of many probes is chosen on rows it is not scored on: a stratified
share (``probes.test_size``) of each prompt's rows is held out before any fit; the probes
are fitted and compared on the rest (their own train/validation split), and the chosen
probe alone is refitted on all of the rest and scored on the held-out rows. Chosen and
scored on one split, the best of SD1.5's 1,600 probes reports about 0.6-0.67 on data
without any difference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

IMPLICIT, EXPLICIT = "implicit", "explicit"


def balanced_rows(implicit: Any, explicit: Any, seed: int) -> tuple[Any, Any]:
    """Both index arrays cut to the smaller one's length by a seeded draw without
    replacement, in their original order."""
    import numpy as np

    n = min(len(implicit), len(explicit))
    rng = np.random.default_rng(seed)
    pick = [np.sort(rng.choice(len(side), n, replace=False)) if len(side) > n
            else np.arange(len(side)) for side in (implicit, explicit)]
    return implicit[pick[0]], explicit[pick[1]]


def held_out_score(stores: Sequence[str | Path], pick: Any, y: Any, select: Any, held: Any,
                   site: str, step: int) -> tuple[float, float]:
    """(train, held-out) accuracy of the paper's probe (``icm.probing.probes.fit_sklearn``) at one
    (site, step), fitted on the rows ``select`` and scored on ``held`` (positions in
    ``pick``, the store rows, and ``y``, their classes)."""
    import numpy as np

    from icm.io.activations import StepStack
    from icm.probing.probes import fit_sklearn

    x = StepStack(list(stores), [site], rows=pick).step(step)[:, 0][:, None, :]
    classes = (np.asarray(y) == EXPLICIT).astype(np.int64)
    train_acc, test_acc, _ = fit_sklearn(x.astype(np.float64), classes, select, held)
    return float(train_acc[0]), float(test_acc[0])
