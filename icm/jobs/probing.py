"""Jobs of stage 3: fit probes per class pair, merge a pair's probe groups, rank sites, and
compare implicit with explicit choices (the paper's Table 3, ``icm.probing.explicit``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icm.io.atomic import write_json, write_table
from icm.probing.explicit import EXPLICIT, IMPLICIT, balanced_rows, held_out_score
from icm.probing.stored import fit_stored, group_sites, write_probes

log = logging.getLogger("icm")


def fit_probes_job(
    concept: Mapping[str, Any], probes: Mapping[str, Any], pair: tuple[str, str],
    labels_csv: str | Path, stores: Sequence[str | Path], output_scores: str | Path,
    output_directions: str | Path, output_meta: str | Path,
    output_heatmap: str | Path | None = None, memory_mb: float = 2000,
    group: tuple[int, int] | None = None, by_prompt: bool = False,
) -> None:
    """Fit one class pair's probes for every (site, step); write scores, directions, and
    (a whole pair, not a group) the heatmap. ``group`` (index, count): only that share of
    the sites (``group_sites``), for ``merge_probes_job`` to join. The torch backend reads
    each width group step by step, in batches of sites sized to ``memory_mb`` (the job's
    memory, not a setting: results do not depend on it). ``by_prompt``: each sample's class
    is the one its class-specific prompt names (``prompt_class``), not the labeler's."""
    import numpy as np
    import pandas as pd

    from icm.hooks.sites import site_kind
    from icm.io.activations import open_store, site_widths
    from icm.io.finite import nonfinite_steps
    from icm.labeling.table import read_labels
    from icm.probing.pairs import REST
    from icm.probing.probes import Pair

    target = Pair(negative=pair[0], positive=pair[1])
    samples = np.concatenate([open_store(p)["sample"][:] for p in stores])
    labels, label_counts = read_labels(labels_csv, samples, concept["classes"])
    if by_prompt:
        if "prompt_class" not in labels:
            raise ValueError(f"{labels_csv}: no prompt_class column; it labels no specific "
                             "prompts' images")
        labels["label"] = labels["prompt_class"].astype(str)
        label_counts["label_source"] = "prompt_class"
    labels = labels[labels["label"] != ""].set_index("sample")
    if target.negative == REST:  # one-vs-rest: every other labelled class is the rest
        labels["label"] = labels["label"].where(labels["label"] == target.positive, REST)
    label_counts["other_classes"] = int((~labels["label"].isin(pair)).sum())
    label_counts["used"] = int(labels["label"].isin(pair).sum())
    control = probes["control"] == "prompt"
    widths = site_widths(stores[0])
    if group is not None:
        mine = set(group_sites(list(widths), group[1], group[0]))
        widths = {s: w for s, w in widths.items() if s in mine}
    # Stores before the step rule was recorded ran 1000-timestep models only.
    train_timesteps = int(open_store(stores[0]).attrs.get("num_train_timesteps", 1000))
    rows, directions = [], {}
    timesteps = open_store(stores[0])["timestep"][:]
    keep = np.flatnonzero(np.isin(samples, labels.index))
    y = labels.loc[samples[keep], "label"].to_numpy()
    prompts = labels.loc[samples[keep], "prompt_index"].to_numpy()
    results = fit_stored(list(stores), widths, keep, y, target, probes, memory_mb,
                         groups=prompts, control=control)
    for r in results:
        directions[r.site] = r.directions.astype(np.float32)
        for step, (tr, te) in enumerate(zip(r.train_acc, r.test_acc)):
            rows.append({"site": r.site, "kind": site_kind(r.site), "step": step,
                         "timestep": float(timesteps[step]),
                         "num_train_timesteps": train_timesteps, "pair": target.name,
                         "negative": target.negative, "positive": target.positive,
                         "train_acc": float(tr), "test_acc": float(te),
                         "prompt_acc": r.prompt_acc, "gain": float(te) - r.prompt_acc,
                         "chance_acc": r.chance_acc,
                         "spread": float(r.spread[step]),
                         "control": probes["control"], "n_train": r.n_train,
                         "n_test": r.n_test, f"n_{target.negative}": r.counts[target.negative],
                         f"n_{target.positive}": r.counts[target.positive]})
    for site, v in directions.items():
        bad = nonfinite_steps(v, 0)
        if bad:
            raise ValueError(f"the {target.name} probes of {site} gave NaN or inf directions at "
                             f"steps {bad}; nothing is written")
    order = list(widths)
    scores = pd.DataFrame(rows).sort_values(["site", "step"], key=lambda c: c.map(
        order.index) if c.name == "site" else c, kind="stable")
    meta = {
        "format": "icm-directions/1",
        "pair": target.name, "positive": target.positive, "negative": target.negative,
        "meaning": "unit vector per (site, step) in unscaled activation space; adding it moves "
                   "toward the positive class",
        "backend": probes["backend"], "test_size": probes["test_size"], "seed": probes["seed"],
        "control": probes["control"],
        "concept": {k: concept[k] for k in ("prompts", "classes", "specific_prompts")
                    if k in concept},
        "labels": {**label_counts, "meaning": "samples of labels.csv: labelled, unlabelled "
                   "(no class or below the margin), labelled with a class outside this pair, "
                   "and used by these probes (before min_per_class)"},
        "num_train_timesteps": train_timesteps,
        "spread": "pooled within-class std of the training samples along each unit vector, "
                  "the unit of alpha_unit: spread",
    }
    write_probes(scores, directions, order, meta, output_scores, output_directions,
                 output_meta, output_heatmap)


def merge_probes_job(
    groups: Sequence[tuple[str | Path, str | Path, str | Path]], output_scores: str | Path,
    output_directions: str | Path, output_meta: str | Path, output_heatmap: str | Path,
) -> None:
    """Join the (scores, directions, meta) of a pair's site groups, in group order, into the
    outputs one ``fit_probes`` job writes."""
    import json

    import pandas as pd
    from safetensors.numpy import load_file

    scores, directions, order, metas = [], {}, [], []
    for table, tensors, record in groups:
        part = pd.read_csv(table, float_precision="round_trip")  # the floats as written
        scores.append(part)
        loaded = load_file(str(tensors))
        sites = list(dict.fromkeys(part["site"]))
        if sorted(sites) != sorted(loaded):
            raise ValueError(f"{tensors} holds {sorted(loaded)}, {table} scores {sites}")
        order += sites
        directions.update(loaded)
        metas.append(json.loads(Path(record).read_text()))
    drop = ("timesteps", "entries", "versions")
    first = {k: v for k, v in metas[0].items() if k not in drop}
    for meta in metas[1:]:
        if {k: v for k, v in meta.items() if k not in drop} != first:
            raise ValueError("the probe groups were fitted with different settings or labels")
    write_probes(pd.concat(scores, ignore_index=True), directions, order, first,
                 output_scores, output_directions, output_meta, output_heatmap)


def rank_sites_job(
    probes: Mapping[str, Any], k: int, scores_csvs: Sequence[str | Path],
    output_ranking: str | Path, output_by_pair: str | Path, output_by_kind: str | Path,
    output_heatmap: str | Path, output_start: str | Path,
) -> None:
    """Choose the steering start, rank sites over all pairs and per pair from it; write both
    rankings, the summary per site kind, the heatmap and the start (``ranking.json``)."""
    import pandas as pd

    from icm.probing.ranking import (
        auto_start_step,
        kind_summary,
        no_start_message,
        plot_heatmap,
        rank_per_pair,
        rank_sites,
        scores_start_step,
        step_timesteps,
    )

    scores = pd.concat([pd.read_csv(p) for p in scores_csvs], ignore_index=True)
    timesteps = step_timesteps(scores)
    record: dict[str, Any] = {"steer_start": probes["steer_start"]}
    if probes["steer_start"] == "auto":
        level, baseline = probes["start_level"], probes["start_baseline"]
        correction = probes["start_correction"]
        sites_per = probes.get("sites_per", "pair")
        t0, pvalues = auto_start_step(scores, k, level, sites_per=sites_per,
                                      baseline=baseline, correction=correction)
        record |= {"start_level": level, "start_baseline": baseline,
                   "start_correction": correction, "k": k, "sites_per": sites_per,
                   "pvalues": [float(p) for p in pvalues]}
        if t0 is None:
            raise ValueError(no_start_message(scores, k, baseline, level, correction))
        which = "per pair" if sites_per == "pair" else "of the concept ranking"
        rule = (f"auto: first step whose {k} best steered-kind sites {which} beat the "
                f"{baseline} baseline (one-sided binomial test, level {level}, "
                f"{correction} over {len(timesteps)} steps)")
    else:
        t0 = scores_start_step(scores, int(probes["steer_start"]))
        rule = f"step {probes['steer_start']} of 50, mapped by timestep"
    record |= {"start_step": int(t0), "start_timestep": float(timesteps.iloc[t0]),
               "start_rule": rule}
    write_json(output_start, record)
    log.info("steering starts at step %d (timestep %g): %s", t0, timesteps.iloc[t0], rule)
    ranking = rank_sites(scores, t0)
    write_table(output_ranking, ranking.to_dict("records"), columns=list(ranking.columns))
    by_pair = rank_per_pair(scores, t0)
    write_table(output_by_pair, by_pair.to_dict("records"), columns=list(by_pair.columns))
    summary = kind_summary(ranking)
    write_table(output_by_kind, summary.to_dict("records"), columns=list(summary.columns))
    plot_heatmap(scores, ranking, output_heatmap,
                 title=f"probe test accuracy (mean over {scores['pair'].nunique()} pairs)")


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

    from icm.generation.samples import specific_prompts
    from icm.hooks.sites import site_kind
    from icm.io.activations import open_store, site_widths
    from icm.io.provenance import package_versions
    from icm.labeling.table import read_labels
    from icm.probing.probes import Pair, split_indices
    from icm.probing.ranking import plot_heatmap
    from icm.probing.stored import fit_stored

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
