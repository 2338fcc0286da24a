"""Implicit or explicit: do the activations of a class the model chose on its own look like
those of the same class asked for by name? (The paper's section 4.5 and Table 3.)

For each specific prompt of class c (``concepts.<c>.specific_prompts``), a probe per (site,
step) tells its images from the general prompts' images of class c, both sides labelled c
by the concept's labeler (a specific-prompt image the labeler reads as another class is left
out, and counted), in equal numbers (the larger side subsampled, seeded), so chance is 50 %.
Accuracy well above it means a choice left to the model is represented differently from
the same content requested explicitly, so that prompt injection, which localizes the
explicit case, need not localize the implicit one.
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


def explicit_vs_implicit_job(
    concept: Mapping[str, Any], probes: Mapping[str, Any], labels_csv: str | Path,
    stores: Sequence[str | Path], specific_labels_csv: str | Path,
    specific_stores: Sequence[str | Path], output_table: str | Path,
    output_scores: str | Path, output_heatmap: str | Path, output_record: str | Path,
    memory_mb: float = 2000,
) -> None:
    """``explicit_vs_implicit.csv``: per specific prompt, the (site, step) whose probe tells
    explicit from implicit best on held-out rows, its train and test accuracy, the mean test
    accuracy over all (site, step) and the counts; ``scores.csv`` every probe; a heatmap of
    the test accuracy averaged over the specific prompts."""
    import numpy as np
    import pandas as pd

    from icm.jobs.generation import specific_prompts
    from icm.jobs.probing import fit_stored
    from icm.label_table import read_labels
    from icm.probes import Pair
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
        results = fit_stored(all_stores, widths, pick, y, target, probes, memory_mb)
        part = pd.DataFrame([
            {"specific_prompt": prompt, "class": name, "site": r.site, "kind": site_kind(r.site),
             "step": step, "timestep": float(timesteps[step]), "train_acc": float(tr),
             "test_acc": float(te), "n_train": r.n_train, "n_test": r.n_test}
            for r in results for step, (tr, te) in enumerate(zip(r.train_acc, r.test_acc))])
        best = part.loc[part["test_acc"].idxmax()]
        row = {"specific_prompt": prompt, "class": name, "best_site": best["site"],
               "best_kind": best["kind"], "best_step": int(best["step"]),
               "train_acc": float(best["train_acc"]), "test_acc": float(best["test_acc"]),
               "mean_test_acc": float(part["test_acc"].mean()), "chance": 0.5}
        # Per site kind: a cross-attention output reads the prompt's own words, which differ
        # by design, so the other kinds say more about the representation of the choice.
        for kind, of_kind in part.groupby("kind", sort=False):
            top = of_kind.loc[of_kind["test_acc"].idxmax()]
            row |= {f"best_{kind}_site": top["site"], f"best_{kind}_step": int(top["step"]),
                    f"best_{kind}_test_acc": float(top["test_acc"]),
                    f"mean_{kind}_test_acc": float(of_kind["test_acc"].mean())}
        summary.append(row | {"n_explicit": len(explicit), "n_implicit": len(implicit),
                              "n_misread": misread, "n_test": int(best["n_test"])})
        scores.append(part)
    scores = pd.concat(scores, ignore_index=True)
    write_table(output_scores, scores.to_dict("records"), columns=list(scores.columns))
    write_table(output_table, summary, columns=list(summary[0]))
    write_json(output_record, {
        "meaning": "probes telling each specific prompt's images from the general prompts' "
                   "images of the same class (both labelled that class, equal numbers: "
                   "chance 0.5); best = highest held-out accuracy over (site, step)",
        "backend": probes["backend"], "test_size": probes["test_size"],
        "seed": probes["seed"], "versions": package_versions()})
    plot_heatmap(scores.rename(columns={"specific_prompt": "pair"}), None, output_heatmap,
                 title=f"explicit vs implicit: probe test accuracy (mean over "
                       f"{len(summary)} specific prompts; chance 0.5)")

