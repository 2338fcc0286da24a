"""Jobs of stages 2-3: label images, fit probes per class pair, rank sites."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icm.devices import resolve_device
from icm.jobs.records import write_json
from icm.tables import write_table

log = logging.getLogger("icm")



def label_images_job(
    concept: Mapping[str, Any], samples_csv: str | Path, output: str | Path,
    sidecar: str | Path, device: str = "auto",
) -> None:
    """Label every generated image; the labeler loads (and fails) before any work. Images
    of class-specific prompts (``concept["specific_prompts"]``) also get the class their
    prompt names (column ``prompt_class``) beside the labeler's."""
    import pandas as pd

    from icm.labels import label_images, make_labeler
    from icm.provenance import package_versions

    labeler = make_labeler(concept["labeler"], concept["classes"],
                           device=str(resolve_device(device)))
    samples = pd.read_csv(samples_csv)
    table = label_images(samples, Path(samples_csv).parent, labeler,
                         margin=concept["labeler"]["margin"])
    extra = {}
    if concept.get("specific_prompts"):
        from icm.jobs.generation import specific_prompts

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



def group_sites(sites: Sequence[str], groups: int, group: int) -> list[str]:
    """Group ``group`` of ``groups`` near-equal runs of ``sites`` (store order): the share of
    one ``fit_probe_group`` job."""
    if not 0 <= group < groups:
        raise ValueError(f"probe group {group} of {groups}")
    size, extra = divmod(len(sites), groups)
    start = group * size + min(group, extra)
    return list(sites[start:start + size + (group < extra)])


def fit_stored(stores: Sequence[str | Path], widths: Mapping[str, int], rows: Any, y: Any,
               target: Any, probes: Mapping[str, Any], memory_mb: float,
               groups: Any = None, control: bool = False) -> list[Any]:
    """``icm.probes.fit_pair`` over the sites ``widths`` names, read from ``stores`` (their
    samples concatenated; ``rows`` picks and orders them, aligned with the labels ``y``).
    The torch backend reads each width group step by step, in batches of sites sized to
    ``memory_mb``; the scikit-learn reference holds a batch's sites in memory."""
    from icm.probes import fit_pair, sites_per_fit
    from icm.store import StepStack, read_sites

    device = str(resolve_device(probes["device"]))
    batches = []  # (sites of one width, fitted together)
    for width in dict.fromkeys(widths.values()):
        sites = [s for s, w in widths.items() if w == width]
        size = sites_per_fit(len(rows), width, memory_mb) if probes["backend"] == "torch" \
            else len(sites)
        batches += [sites[i:i + size] for i in range(0, len(sites), size)]
    log.info("%d sites in %d batched fits", len(widths), len(batches))
    results = []
    for sites in batches:
        if probes["backend"] == "torch":  # read step by step: memory of one step
            activations = StepStack(list(stores), sites, rows=rows)
        else:
            activations = {s: a[rows] for s, a in read_sites(list(stores), sites)[1].items()}
        results += fit_pair(activations, y, target,
                            backend=probes["backend"], test_size=probes["test_size"],
                            seed=probes["seed"], min_per_class=probes["min_per_class"],
                            device=device, groups=groups, control=control)
    return results


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

    from icm.finite import nonfinite_steps
    from icm.label_table import read_labels
    from icm.pairs import REST
    from icm.probes import Pair
    from icm.sites import site_kind
    from icm.store import open_store, site_widths

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


def write_probes(scores: Any, directions: Mapping[str, Any], order: Sequence[str],
                 meta: Mapping[str, Any], output_scores: str | Path,
                 output_directions: str | Path, output_meta: str | Path,
                 output_heatmap: str | Path | None) -> None:
    """A pair's (or a group's) scores.csv, directions.safetensors and directions.json; the
    heatmap too when given a path."""
    from safetensors.numpy import save_file

    from icm.jobs.records import written
    from icm.provenance import package_versions
    from icm.ranking import plot_heatmap, step_timesteps

    Path(output_scores).parent.mkdir(parents=True, exist_ok=True)
    write_table(output_scores, scores.to_dict("records"), columns=list(scores.columns))
    with written(output_directions) as partial:
        save_file({s: directions[s] for s in order}, str(partial),
                  metadata={"pair": meta["pair"], "positive": meta["positive"]})
    write_json(output_meta, {
        **meta,
        "timesteps": [float(t) for t in step_timesteps(scores)],
        "entries": [{k: row[k] for k in ("site", "step", "timestep", "train_acc", "test_acc",
                                         "spread")}
                    for row in scores.to_dict("records")],
        "versions": package_versions(),
    })
    # No steering start here: it is the ranking's business (rank_sites), so that changing
    # it does not refit the probes.
    if output_heatmap is not None:
        plot_heatmap(scores, None, output_heatmap,
                     title=f"probe test accuracy, {meta['negative']} vs {meta['positive']}")


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

    from icm.ranking import (
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
