"""How good is the toy model? Fidelity on fully specified prompts, planted bias on vague ones.

Both are read off by the pixel oracle, so they are ground truth for this world.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from icm.generation.samples import plan_samples
from icm.generation.shard import SamplerSettings, batches, generate_images
from icm.toy.oracle import oracle_label
from icm.toy.world import COLORS, SHAPES

FULL_PROMPTS = tuple(f"a {color} {shape}" for color in COLORS for shape in SHAPES)
OPEN_PROMPTS = ("a circle", "a square", "a triangle", "a shape")


def measure_quality(
    pipe: Any,
    settings: SamplerSettings,
    n_per_prompt: int = 64,
    seed: int = 1234,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Oracle read-out of ``n_per_prompt`` samples of every full and open prompt."""
    prompts = [*FULL_PROMPTS, *OPEN_PROMPTS]
    samples = plan_samples(prompts, n_per_prompt, base_seed=seed)
    labels = []
    for batch in batches(samples, batch_size):
        labels += [oracle_label(np.asarray(im)) for im in generate_images(pipe, batch, settings)]
    rows: dict[str, dict[str, Any]] = {}
    for i, prompt in enumerate(prompts):
        mine = labels[i * n_per_prompt : (i + 1) * n_per_prompt]
        colors = Counter(label.color for label in mine)
        shapes = Counter(label.shape for label in mine)
        row: dict[str, Any] = {
            "n": n_per_prompt,
            "color_share": {c: colors[c] / n_per_prompt for c in COLORS},
            "shape_share": {s: shapes[s] / n_per_prompt for s in SHAPES},
        }
        if prompt in FULL_PROMPTS:
            _, color, shape = prompt.split()
            row["color_ok"] = colors[color] / n_per_prompt
            row["shape_ok"] = shapes[shape] / n_per_prompt
            row["both_ok"] = (
                sum(lab.color == color and lab.shape == shape for lab in mine) / n_per_prompt
            )
        rows[prompt] = row
    full = [rows[p] for p in FULL_PROMPTS]
    return {
        "settings": settings.record(),
        "n_per_prompt": n_per_prompt,
        "seed": seed,
        "full_both_ok": float(np.mean([r["both_ok"] for r in full])),
        "full_color_ok": float(np.mean([r["color_ok"] for r in full])),
        "full_shape_ok": float(np.mean([r["shape_ok"] for r in full])),
        "circle_red_share": rows["a circle"]["color_share"]["red"],
        "square_blue_share": rows["a square"]["color_share"]["blue"],
        "prompts": rows,
    }


def quality_markdown(result: dict[str, Any]) -> str:
    """The tables that go into docs/toy.md."""
    lines = [
        f"Fully specified prompts ({result['n_per_prompt']} samples each, oracle read-out): "
        f"colour right {result['full_color_ok']:.1%}, shape right {result['full_shape_ok']:.1%}, "
        f"both right **{result['full_both_ok']:.1%}**.",
        "",
        "| prompt | colour right | shape right | both right |",
        "|---|---|---|---|",
    ]
    for prompt in FULL_PROMPTS:
        r = result["prompts"][prompt]
        lines.append(
            f"| {prompt} | {r['color_ok']:.0%} | {r['shape_ok']:.0%} | {r['both_ok']:.0%} |"
        )
    lines += [
        "",
        "Open prompts: the colour the model chooses itself.",
        "",
        "| prompt | red | green | blue | circle | square | triangle |",
        "|---|---|---|---|---|---|---|",
    ]
    for prompt in OPEN_PROMPTS:
        r = result["prompts"][prompt]
        cells = [f"{r['color_share'][c]:.0%}" for c in COLORS]
        cells += [f"{r['shape_share'][s]:.0%}" for s in SHAPES]
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
