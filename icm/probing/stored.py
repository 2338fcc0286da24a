"""Probes fitted straight from activation stores: the sites a job of a probe group takes,
the fit over every (site, step) of a store, and the score and direction files it writes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icm.io.atomic import write_json, write_table
from icm.models.devices import resolve_device

log = logging.getLogger("icm")


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
    """``icm.probing.probes.fit_pair`` over the sites ``widths`` names, read from ``stores`` (their
    samples concatenated; ``rows`` picks and orders them, aligned with the labels ``y``).
    The torch backend reads each width group step by step, in batches of sites sized to
    ``memory_mb``; the scikit-learn reference holds a batch's sites in memory."""
    from icm.io.activations import StepStack, read_sites
    from icm.probing.probes import fit_pair, sites_per_fit

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


def write_probes(scores: Any, directions: Mapping[str, Any], order: Sequence[str],
                 meta: Mapping[str, Any], output_scores: str | Path,
                 output_directions: str | Path, output_meta: str | Path,
                 output_heatmap: str | Path | None) -> None:
    """A pair's (or a group's) scores.csv, directions.safetensors and directions.json; the
    heatmap too when given a path."""
    from safetensors.numpy import save_file

    from icm.io.atomic import written
    from icm.io.provenance import package_versions
    from icm.probing.ranking import plot_heatmap, step_timesteps

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
