"""Job of stage 2: pseudo-label each generated image with the concept's labeler."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from icm.io.atomic import write_json, write_table
from icm.models.devices import resolve_device

log = logging.getLogger("icm")


def label_images_job(
    concept: Mapping[str, Any], samples_csv: str | Path, output: str | Path,
    sidecar: str | Path, device: str = "auto",
) -> None:
    """Label every generated image; the labeler loads (and fails) before any work. Images
    of class-specific prompts (``concept["specific_prompts"]``) also get the class their
    prompt names (column ``prompt_class``) beside the labeler's."""
    import pandas as pd

    from icm.io.provenance import package_versions
    from icm.labeling.labelers import label_images, make_labeler

    labeler = make_labeler(concept["labeler"], concept["classes"],
                           device=str(resolve_device(device)))
    samples = pd.read_csv(samples_csv)
    table = label_images(samples, Path(samples_csv).parent, labeler,
                         margin=concept["labeler"]["margin"])
    extra = {}
    if concept.get("specific_prompts"):
        from icm.generation.samples import specific_prompts

        named = specific_prompts(concept)
        table["prompt_class"] = samples["prompt"].map(named).to_numpy()
        if table["prompt_class"].isna().any():
            raise ValueError(f"{samples_csv}: prompts that are not specific prompts of the "
                             "concept; regenerate (rule generate_specific_images)")
        agree = table["label"] == table["prompt_class"]
        extra["agreement"] = {"meaning": "share of each class's specific-prompt images the "
                              "labeler gives that class",
                              **{c: float(agree[table["prompt_class"] == c].mean())
                                 for c in dict.fromkeys(named.values())}}
    write_table(output, table.to_dict("records"), columns=list(table.columns))
    counts = table.loc[table["kept"], "label"].value_counts().to_dict()
    unscored = table["margin"].isna()
    faceless = ~table["face"] if "face" in table else pd.Series(False, index=table.index)
    dropped = {"no class": int((unscored & ~faceless).sum()),
               "below margin": int((~table["kept"] & ~unscored).sum())}
    if "face" in table:  # FairFace on face crops: no face found, no label
        dropped["no face"] = int(faceless.sum())
    write_json(sidecar, {"labeler": labeler.name, "classes": concept["classes"],
                          "margin": concept["labeler"]["margin"], "counts": counts,
                          "dropped": int((~table["kept"]).sum()), "dropped_by_reason": dropped,
                          **extra, "versions": package_versions()})
    log.info("labelled %d images: %s; dropped %s", len(table), counts, dropped)
