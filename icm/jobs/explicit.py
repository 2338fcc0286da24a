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
without any difference.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icm.jobs.records import write_json
from icm.tables import write_table

log = logging.getLogger("icm")

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
    """(train, held-out) accuracy of the paper's probe (``icm.probes.fit_sklearn``) at one
    (site, step), fitted on the rows ``select`` and scored on ``held`` (positions in
    ``pick``, the store rows, and ``y``, their classes)."""
    import numpy as np

    from icm.probes import fit_sklearn
    from icm.store import StepStack

    x = StepStack(list(stores), [site], rows=pick).step(step)[:, 0][:, None, :]
    classes = (np.asarray(y) == EXPLICIT).astype(np.int64)
    train_acc, test_acc, _ = fit_sklearn(x.astype(np.float64), classes, select, held)
    return float(train_acc[0]), float(test_acc[0])


def explicit_vs_implicit_job(
    concept: Mapping[str, Any], probes: Mapping[str, Any], labels_csv: str | Path,
    stores: Sequence[str | Path], specific_labels_csv: str | Path,
    specific_stores: Sequence[str | Path], output_table: str | Path,
    output_scores: str | Path, output_heatmap: str | Path, output_record: str | Path,
    memory_mb: float = 2000,
) -> None:
    """``explicit_vs_implicit.csv``: per specific prompt, the (site, step) whose probe tells
    explicit from implicit best on validation rows, its train accuracy and its accuracy on
    rows held out from the choice (``test_acc``), the mean validation accuracy over all
    (site, step) and the counts; ``scores.csv`` every probe; a heatmap of the validation
    accuracy averaged over the specific prompts."""
    import numpy as np
    import pandas as pd

    from icm.jobs.generation import specific_prompts
    from icm.jobs.probing import fit_stored
    from icm.label_table import read_labels
    from icm.probes import Pair, split_indices
    from icm.provenance import package_versions
    from icm.ranking import plot_heatmap
    from icm.sites import site_kind
    from icm.store import open_store, site_widths

    classes = list(concept["classes"])
    general = np.concatenate([open_store(p)["sample"][:] for p in stores])
    specific = np.concatenate([open_store(p)["sample"][:] for p in specific_stores])
    labels, _ = read_labels(labels_csv, general, classes)
    specific_labels, _ = read_labels(specific_labels_csv, specific, classes)
    widths = site_widths(stores[0])
    if site_widths(specific_stores[0]) != widths:
        raise ValueError("the specific prompts' stores hold other sites or widths than the "
                         "general prompts': regenerate them with the same model")
    timesteps = open_store(stores[0])["timestep"][:]
    if not np.allclose(open_store(specific_stores[0])["timestep"][:], timesteps):
        raise ValueError("the specific prompts' stores have other timesteps than the general "
                         "prompts': regenerate them with the same model settings")
    general_label = labels.set_index("sample").loc[general, "label"].to_numpy()
    rows = specific_labels.set_index("sample").loc[specific]
    target = Pair(negative=IMPLICIT, positive=EXPLICIT)
    all_stores = [*stores, *specific_stores]  # rows: general samples first, then specific
    scores, summary = [], []
    if "prompt_class" not in rows:
        raise ValueError(f"{specific_labels_csv}: no prompt_class column; relabel the "
                         "specific prompts' images (rule label_specific_images)")
    # The specific generation numbers its prompts in specific_prompts' order.
    for index, (prompt, name) in enumerate(specific_prompts(concept).items()):
        implicit = np.flatnonzero(general_label == name)
        of_prompt = rows["prompt_index"].to_numpy() == index
        if (rows.loc[of_prompt, "prompt_class"] != name).any():
            raise ValueError(f"{specific_labels_csv}: prompt {index} is not {prompt!r} of "
                             f"class {name}: the specific prompts changed; regenerate")
        explicit = np.flatnonzero(of_prompt & (rows["label"].to_numpy() == name))
        misread = int(of_prompt.sum()) - len(explicit)
        implicit, explicit = balanced_rows(implicit, explicit, probes["seed"])
        pick = np.concatenate([implicit, len(general) + explicit])
        y = np.array([IMPLICIT] * len(implicit) + [EXPLICIT] * len(explicit))
        log.info("%s: %d explicit (%d read as another class, left out) vs %d implicit",
                 prompt, len(explicit), misread, len(implicit))
        select, held = split_indices(y, probes["test_size"], probes["seed"])
        results = fit_stored(all_stores, widths, pick[select], y[select], target, probes,
                             memory_mb)
        part = pd.DataFrame([
            {"specific_prompt": prompt, "class": name, "site": r.site, "kind": site_kind(r.site),
             "step": step, "timestep": float(timesteps[step]), "train_acc": float(tr),
             "validation_acc": float(va), "n_train": r.n_train, "n_validation": r.n_test}
            for r in results for step, (tr, va) in enumerate(zip(r.train_acc, r.test_acc))])

        scored: dict[tuple[str, int], tuple[float, float]] = {}  # a kind's best may be it

        def chosen(rows: pd.DataFrame) -> tuple[pd.Series, float, float]:
            best = rows.loc[rows["validation_acc"].idxmax()]
            key = (best["site"], int(best["step"]))
            if key not in scored:
                scored[key] = held_out_score(all_stores, pick, y, select, held, *key)
            return best, *scored[key]

        best, train_acc, test_acc = chosen(part)
        row = {"specific_prompt": prompt, "class": name, "best_site": best["site"],
               "best_kind": best["kind"], "best_step": int(best["step"]),
               "train_acc": train_acc, "test_acc": test_acc,
               "validation_acc": float(best["validation_acc"]),
               "mean_validation_acc": float(part["validation_acc"].mean()), "chance": 0.5}
        # Per site kind: a cross-attention output reads the prompt's own words, which differ
        # by design, so the other kinds say more about the representation of the choice.
        for kind, of_kind in part.groupby("kind", sort=False):
            top, _, top_test = chosen(of_kind)
            row |= {f"best_{kind}_site": top["site"], f"best_{kind}_step": int(top["step"]),
                    f"best_{kind}_test_acc": top_test,
                    f"mean_{kind}_validation_acc": float(of_kind["validation_acc"].mean())}
        summary.append(row | {"n_explicit": len(explicit), "n_implicit": len(implicit),
                              "n_misread": misread, "n_test": len(held)})
        scores.append(part)
    scores = pd.concat(scores, ignore_index=True)
    write_table(output_scores, scores.to_dict("records"), columns=list(scores.columns))
    write_table(output_table, summary, columns=list(summary[0]))
    write_json(output_record, {
        "meaning": "probes telling each specific prompt's images from the general prompts' "
                   "images of the same class (both labelled that class, equal numbers: "
                   "chance 0.5); best = highest validation accuracy over (site, step), "
                   "test_acc = that probe refitted on the selection rows and scored on rows "
                   "held out from the choice",
        "backend": probes["backend"], "test_size": probes["test_size"],
        "seed": probes["seed"], "versions": package_versions()})
    plot_heatmap(scores.rename(columns={"specific_prompt": "pair",
                                        "validation_acc": "test_acc"}), None, output_heatmap,
                 title=f"explicit vs implicit: probe validation accuracy (mean over "
                       f"{len(summary)} specific prompts; chance 0.5)")

