"""Rank sites by how well their probes read the choice once steering would begin.

Score of a site = mean test accuracy of its probes over steps ``t0..S-1`` (and over the
concept's class pairs; ``mean_gain`` is the same above the prompt-only baseline), where
``t0`` is the steering start: by default the first step at which the selected sites beat
chance significantly, corrected for testing every step (``auto_start_step``), or a step "of
50" mapped by timestep (``icm.hooks.clock.start_step``). Each pair is also ranked on its own probes
(``rank_per_pair``): a pair's steering direction uses the sites that read that pair best.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from icm.hooks.clock import start_step  # noqa: E402
from icm.hooks.sites import SITE_KINDS, site_kind  # noqa: E402


def step_timesteps(scores: pd.DataFrame) -> pd.Series:
    """The step axis of a scores table: the timestep of each step 0..S-1."""
    steps = scores.groupby("step", sort=True)["timestep"].first()
    if list(steps.index) != list(range(len(steps))):
        raise ValueError(f"scores cover steps {list(steps.index)}, not 0..{len(steps) - 1}")
    return steps


def scores_start_step(scores: pd.DataFrame, start_of_50: int) -> int:
    """The steering start of a scores table (columns step, timestep, num_train_timesteps)."""
    train = int(scores["num_train_timesteps"].iloc[0])
    return start_step(step_timesteps(scores).to_numpy(), train, start_of_50)


def rank_sites(scores: pd.DataFrame, t0: int) -> pd.DataFrame:
    """One row per site, best first. ``scores`` has columns site, step, pair, test_acc."""
    late = scores[scores["step"] >= t0]
    aggregates = {"mean_test_acc": ("test_acc", "mean"), "max_test_acc": ("test_acc", "max")}
    if "prompt_acc" in late:  # what the activations add beyond the prompt
        late = late.assign(gain=late["test_acc"] - late["prompt_acc"])
        aggregates["mean_gain"] = ("gain", "mean")
    table = late.groupby("site", sort=False).agg(**aggregates).reset_index()
    table["kind"] = table["site"].map(site_kind)
    table["block"] = table["site"].str.rsplit(".", n=1).str[0]
    table = table.sort_values("mean_test_acc", ascending=False, kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table["from_step"] = t0
    return table.reset_index(drop=True)


#: What the automatic start compares the probes with: ``chance``, the majority-class rate of
#: the test split (the paper's "significantly exceeds a random guess"), or ``prompt``, the
#: prompt-only baseline (each prompt's majority class: what the activations add to it).
START_BASELINES = {"chance": "chance_acc", "prompt": "prompt_acc"}
#: Corrections for testing every step: ``bonferroni`` (level / steps) or ``none``.
START_CORRECTIONS = ("bonferroni", "none")


def start_pvalues(scores: pd.DataFrame, selected: dict[str, list[str]],
                  baseline: str = "chance") -> np.ndarray:
    """Per step, the one-sided binomial p-value that the selected sites' probes beat the
    ``baseline`` (``START_BASELINES``): successes = mean test accuracy of each pair's
    selected sites x its test samples, summed over pairs, against p0 = the pairs' baseline
    accuracy. The sites share test samples, so this treats their mean as one probe's
    accuracy."""
    from scipy.stats import binomtest

    column = START_BASELINES[baseline]
    if column not in scores:
        raise ValueError(f"the probe scores have no {column} column (baseline {baseline!r}): "
                         "refit the probes")
    steps = sorted(scores["step"].unique())
    out = np.ones(len(steps))
    for i, step in enumerate(steps):
        hits = trials = expected = 0.0
        for pair, sites in selected.items():
            rows = scores[(scores["pair"] == pair) & (scores["step"] == step)
                          & scores["site"].isin(sites)]
            n = int(rows["n_test"].iloc[0])
            hits += rows["test_acc"].mean() * n
            trials += n
            expected += float(rows[column].iloc[0]) * n
        p0 = min(expected / trials, 1.0)
        out[i] = binomtest(int(round(hits)), int(trials), p0, alternative="greater").pvalue
    return out


def corrected_level(level: float, steps: int, correction: str) -> float:
    """The per-step level that keeps the chance of any false start at ``level``."""
    if correction not in START_CORRECTIONS:
        raise ValueError(f"unknown start correction {correction!r}; use {START_CORRECTIONS}")
    return level / steps if correction == "bonferroni" else level


def auto_start_step(scores: pd.DataFrame, k: int, level: float, rounds: int = 5,
                    sites_per: str = "pair", baseline: str = "chance",
                    correction: str = "bonferroni") -> tuple[int | None, np.ndarray]:
    """The paper's rule (section 4.1): steer from the first step at which the probes of the
    sites steering would use (the k best self-attention sites of each pair's ranking, or
    with ``sites_per="concept"`` of the concept ranking) "significantly exceed a random
    guess": ``start_pvalues`` against ``baseline`` below ``level``, corrected for testing
    every step (``corrected_level``). The sites are ranked from the start they give, so the
    two are solved together from start 0 until they agree. None when no step is
    significant."""
    from icm.steering.selection import sites_per_pair

    pairs = list(dict.fromkeys(scores["pair"]))
    per_step = corrected_level(level, scores["step"].nunique(), correction)
    t0 = 0
    for _ in range(rounds):
        if sites_per == "concept":
            selected = sites_per_pair(rank_sites(scores, t0), None, pairs, "top", k, seed=0)
        else:
            selected = sites_per_pair(None, rank_per_pair(scores, t0), pairs, "top", k, seed=0)
        pvalues = start_pvalues(scores, selected, baseline)
        significant = np.flatnonzero(pvalues < per_step)
        if not len(significant):
            return None, pvalues
        start = int(significant[0])
        if start == t0:
            break
        t0 = start
    return t0, pvalues


def no_start_message(scores: pd.DataFrame, k: int, baseline: str, level: float,
                     correction: str) -> str:
    """Why no step qualifies, per pair: its best step, the mean test accuracy of its k best
    sites there, and the baseline they had to beat."""
    column = START_BASELINES[baseline]
    lines = []
    for pair, group in scores.groupby("pair", sort=False):
        mean = (group.sort_values("test_acc", ascending=False).groupby("step").head(k)
                .groupby("step").agg(test_acc=("test_acc", "mean"), base=(column, "first")))
        best = mean["test_acc"].idxmax()
        lines.append(f"{pair}: best step {best}, its {k} best sites "
                     f"{mean.loc[best, 'test_acc']:.3f} vs {baseline} {mean.loc[best, 'base']:.3f}")
    return (f"no step's probes beat the {baseline} baseline significantly (level {level}, "
            f"{correction} over {scores['step'].nunique()} steps): " + "; ".join(lines) +
            ". Label more samples, or set probes.steer_start to a step (the paper's 15).")


def rank_per_pair(scores: pd.DataFrame, t0: int) -> pd.DataFrame:
    """``rank_sites`` on each pair's own scores, stacked, with a ``pair`` column first."""
    parts = []
    for pair, group in scores.groupby("pair", sort=False):
        ranked = rank_sites(group, t0)
        ranked.insert(0, "pair", pair)
        parts.append(ranked)
    return pd.concat(parts, ignore_index=True)


def kind_summary(ranking: pd.DataFrame) -> pd.DataFrame:
    """Self- vs cross-attention: mean and best score per kind (the paper's section 4.3)."""
    summary = ranking.groupby("kind").agg(
        sites=("site", "count"), mean_test_acc=("mean_test_acc", "mean"),
        best_test_acc=("mean_test_acc", "max")).reset_index()
    summary["kind_name"] = summary["kind"].map(SITE_KINDS)
    return summary


def plot_heatmap(scores: pd.DataFrame, ranking: pd.DataFrame | None, path: str | Path,
                 title: str = "") -> None:
    """Site x step test-accuracy heatmap (as the paper's figures 4 and 10), sites in
    forward order, pairs averaged; with a ``ranking``, its steering start is marked and its
    top three sites are in bold."""
    grid = scores.pivot_table(index="site", columns="step", values="test_acc", aggfunc="mean",
                              sort=False)
    order = list(dict.fromkeys(scores["site"]))
    grid = grid.loc[order]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * grid.shape[1] + 4), 0.32 * len(grid) + 1.5))
    image = ax.imshow(grid.values, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0)
    ax.set_yticks(range(len(grid)), [short_site(s) for s in grid.index], fontsize=7)
    ax.set_xlabel("denoising step")
    top = set()
    if ranking is not None:
        ax.axvline(ranking["from_step"].iloc[0] - 0.5, color="white", linestyle="--",
                   linewidth=1)
        top = set(ranking.head(3)["site"])
    for label in ax.get_yticklabels():
        if any(short_site(s) == label.get_text() for s in top):
            label.set_fontweight("bold")
    fig.colorbar(image, ax=ax, label="probe test accuracy")
    ax.set_title(title or "probe test accuracy per site and step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def short_site(site: str) -> str:
    """``up_blocks.1.attentions.0.transformer_blocks.0.attn1`` -> ``up1.a0.t0.attn1``."""
    return (site.replace("down_blocks.", "down").replace("up_blocks.", "up")
            .replace("mid_block", "mid").replace(".attentions.", ".a")
            .replace(".transformer_blocks.", ".t"))
