"""What ICM finetuning trains on and where (the paper's appendix C): the training set of
labelled localization images, the sites a LoRA variant adapts, and its loss plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def training_set(concept: Mapping[str, Any], samples_csv: str | Path, labels_csv: str | Path,
                 seed: int) -> tuple[Any, dict[str, Any]]:
    """The finetuning images: specific-prompt images the labeler reads as their prompt's
    class (the others are counted and left out), each class subsampled so the classes mix
    as the concept's reference distribution (uniform by default), each image reported
    under the general prompt closest to its specific one (``general_prompt_for``)."""
    import numpy as np
    import pandas as pd

    from icm.finetuning.lora import general_prompt_for
    from icm.steering.batch_targets import target_probabilities

    samples = pd.read_csv(samples_csv, keep_default_na=False)
    labels = pd.read_csv(labels_csv, keep_default_na=False, dtype={"label": str})
    table = samples.merge(labels[["sample", "label", "prompt_class"]], on="sample",
                          validate="one_to_one")
    classes = list(concept["classes"])
    agree = table[table["label"] == table["prompt_class"]]
    probs = dict(zip(classes, target_probabilities(classes, concept.get("reference")),
                     strict=True))
    counts = agree["prompt_class"].value_counts().to_dict()
    wanted = [c for c in classes if probs[c] > 0]
    missing = [c for c in wanted if not counts.get(c)]
    if missing:
        raise ValueError(f"no specific-prompt image the labeler reads as {missing}: "
                         "nothing to finetune toward them")
    total = min(counts[c] / probs[c] for c in wanted)
    rng = np.random.default_rng(seed)
    parts = []
    for name in wanted:
        rows = agree[agree["prompt_class"] == name]
        take = int(np.floor(total * probs[name] + 1e-9))
        parts.append(rows.iloc[np.sort(rng.choice(len(rows), take, replace=False))])
    chosen = pd.concat(parts, ignore_index=True)
    general = list(concept["prompts"])
    pairing = {p: general_prompt_for(p, general) for p in dict.fromkeys(table["prompt"])}
    chosen["general_prompt"] = chosen["prompt"].map(pairing)
    summary = {"images": len(chosen), "per_class": {
                   k: int(v) for k, v in chosen["prompt_class"].value_counts().items()},
               "misread_left_out": int(len(table) - len(agree)),
               "prompt_pairing": pairing,
               "mix": "the concept's reference distribution (uniform when null)"}
    return chosen, summary


def lora_sites(concept: Mapping[str, Any], variant: Mapping[str, Any],
               ranking: str | Path | None, pair_ranking: str | Path | None) -> list[str]:
    """The sites a LoRA variant trains: the selection of the concept ranking, or with a
    per-pair ranking the union, in order, of each pair's selection (as steering chooses
    them: the paper's race LoRA trains the union of its black, indian and asian layers)."""
    import pandas as pd

    from icm.probing.pairs import Pair
    from icm.steering.selection import sites_per_pair

    names = [Pair(*p).name for p in concept["pairs"]]
    per_pair = sites_per_pair(pd.read_csv(ranking) if ranking else None,
                              pd.read_csv(pair_ranking) if pair_ranking else None,
                              names, variant["sites"], variant.get("k"), variant["seed"])
    return list(dict.fromkeys(s for pair in names for s in per_pair[pair]))


def plot_losses(losses: Sequence[float], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(losses, color="0.7", linewidth=0.8, label="step")
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(len(smooth)) + window - 1, smooth, color="tab:blue", label="running mean")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss")
    ax.set_title(f"LoRA training: {title}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
