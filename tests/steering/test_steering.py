"""Steering: alpha 0 changes nothing, the shift lands exactly where and when it should."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from icm.hooks.capture import token_mean
from icm.hooks.registry import DoubleHookError, SiteHooks
from icm.hooks.sites import denoiser_of, list_sites
from icm.hooks.steering import steer_activations
from icm.models.families import image_stream, site_width

PROMPTS = ["a photo of a person", "a portrait of a woman"]
STEPS = 4


def run(pipe, seed=0):
    generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=STEPS, height=32, width=32, guidance_scale=7.5,
                generator=generator, output_type="np").images


class RowMeans(SiteHooks):
    """Records the token mean of every row (both CFG halves) of a site at every step."""

    purpose = "record"

    def __init__(self, pipe, sites):
        super().__init__(pipe, sites, cfg="all")
        self.means: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}

    def on_output(self, site, step, output):
        self.means[site].append(token_mean(image_stream(site, output)).detach().clone())


def directions_for(pipe, sites, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for site in sites:
        width = site_width(denoiser_of(pipe), site)  # the bottleneck's too
        v = rng.standard_normal((STEPS, width)).astype(np.float32)
        out[site] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def test_alpha_zero_reproduces_the_unsteered_image_bit_for_bit(tiny_pipe):
    sites = list_sites(denoiser_of(tiny_pipe))
    plain = run(tiny_pipe)
    with steer_activations(tiny_pipe, directions_for(tiny_pipe, sites), alpha=0.0, start_step=0):
        steered = run(tiny_pipe)
    np.testing.assert_array_equal(steered, plain)
    with steer_activations(tiny_pipe, directions_for(tiny_pipe, sites), alpha=5.0, start_step=1):
        moved = run(tiny_pipe)
    assert np.abs(moved - plain).max() > 1e-3


@pytest.mark.parametrize("kind", ["attn1", "h-space"])
def test_shift_is_alpha_v_on_the_conditional_half_from_the_start_step(tiny_pipe, kind):
    """On a self-attention site and on the bottleneck (mid_block, added at every position)."""
    sites = list_sites(denoiser_of(tiny_pipe))
    site = "mid_block" if kind == "h-space" else [s for s in sites if s.endswith("attn1")][0]
    directions = directions_for(tiny_pipe, [site])
    t0, alpha = 2, 3.0
    with RowMeans(tiny_pipe, [site]) as plain:
        run(tiny_pipe)
    with steer_activations(tiny_pipe, directions, alpha, t0), RowMeans(tiny_pipe, [site]) as hit:
        run(tiny_pipe)
    before, after = plain.means[site], hit.means[site]
    for step in range(t0):  # nothing happens before the start step
        torch.testing.assert_close(after[step], before[step], rtol=0, atol=0)
    # At t0 the inputs are still identical, so the output moves by exactly alpha * v on the
    # conditional rows (the second half of [uncond, cond]) and not at all on the others.
    half = before[t0].shape[0] // 2
    shift = after[t0] - before[t0]
    expected = alpha * torch.as_tensor(directions[site][t0])
    torch.testing.assert_close(shift[half:], expected.expand_as(shift[half:]), rtol=0, atol=1e-5)
    assert shift[:half].abs().max() == 0
    assert not np.array_equal(run(tiny_pipe), steered_images(tiny_pipe, directions, alpha, t0))


def steered_images(pipe, directions, alpha, start):
    with steer_activations(pipe, directions, alpha, start):
        return run(pipe)


def test_hooks_are_exclusive_and_always_removed(tiny_pipe):
    site = list_sites(denoiser_of(tiny_pipe))[0]
    directions = directions_for(tiny_pipe, [site])
    with steer_activations(tiny_pipe, directions, 1.0, 0):
        with pytest.raises(DoubleHookError):
            with steer_activations(tiny_pipe, directions, 1.0, 0):
                pass
    with pytest.raises(RuntimeError, match="directions cover 2 steps"):
        short = {site: directions[site][:2]}
        with steer_activations(tiny_pipe, short, 1.0, 0):
            run(tiny_pipe)
    unet = denoiser_of(tiny_pipe)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def cosine_floor(value):
    from icm.steering.calibration import ClipFloor

    return ClipFloor(value, "cosine")


def test_the_alpha_rule_keeps_the_lowest_fd_above_the_fidelity_floor():
    import pandas as pd

    from icm.steering.calibration import choose_alpha

    sweep = pd.DataFrame({"alpha": [0, 2, 4, 8, 16, 32],
                          "FD": [0.40, 0.35, 0.20, 0.12, 0.05, 0.30],
                          "CLIP-I": [1.0, 0.97, 0.92, 0.85, 0.70, 0.40]})
    assert choose_alpha(sweep, cosine_floor(0.8))[0] == 8  # 16 is fairer but costs too much
    assert choose_alpha(sweep, cosine_floor(0.6))[0] == 16
    tied = sweep.assign(FD=[0.4, 0.2, 0.2, 0.3, 0.3, 0.3])
    assert choose_alpha(tied, cosine_floor(0.8))[0] == 2  # the smaller of equal FDs
    alpha, rule = choose_alpha(sweep, cosine_floor(0.99))
    assert alpha == 2 and "no alpha keeps" in rule


def test_the_papers_gender_operating_point_passes_the_default_floor():
    """The paper reports CLIP-I as (cos + 1) / 2: its ICM gender point (FD 0.087 at 0.850,
    a cosine of 0.70) must be selectable under the default floor, which a cosine floor of
    0.8 (the old default, compared with the raw cosine) forbade in favour of FD 0.200."""
    import pandas as pd
    import yaml
    from snakemake.utils import validate

    from icm.evaluation.images import paper_scale
    from icm.steering.calibration import ClipFloor, choose_alpha

    cosines = [1.0, 0.92, 0.81, 0.70, 0.55]
    sweep = pd.DataFrame({"alpha": [0, 5, 10, 15, 20], "FD": [0.45, 0.30, 0.20, 0.087, 0.05],
                          "CLIP-I": cosines, "CLIP-I_paper": [paper_scale(c) for c in cosines]})
    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["steering"]["calibration"] = {}  # the schema's defaults
    validate(config, str(root / "schemas" / "config.schema.yaml"))
    floor = ClipFloor.of(config["steering"]["calibration"])
    assert (floor.value, floor.scale) == (0.85, "paper")
    alpha, rule = choose_alpha(sweep, floor)
    assert alpha == 15 and "0.087" in rule and "(cos + 1) / 2" in rule
    assert choose_alpha(sweep, cosine_floor(0.8))[0] == 10  # the old rule: FD 0.200
    assert floor.cosine() == pytest.approx(0.70)
    for paper_point in (0.850, 0.865, 0.883):  # Table 1 and 4's gender operating points
        assert paper_point >= floor.value
    with pytest.raises(ValueError, match="clip_i_scale"):
        ClipFloor(0.8, "percent")


def test_the_alpha_rule_weighs_fid_against_the_unsteered_images_where_measured():
    """On the toy, `icm` was kept at FID 493, three times the original's: with FID in the
    sweep, an alpha may cost at most max_fid_ratio x the unsteered FID."""
    import pandas as pd

    from icm.steering.calibration import choose_alpha

    sweep = pd.DataFrame({"alpha": [0, 8, 16, 32, 64], "FD": [0.41, 0.41, 0.27, 0.18, 0.12],
                          "CLIP-I": [1.0, 0.96, 0.89, 0.80, 0.66],
                          "FID": [150.0, 160.0, 210.0, 480.0, 700.0]})
    floor = cosine_floor(0.7)
    assert choose_alpha(sweep, floor)[0] == 32  # CLIP-I alone: FID 480
    alpha, rule = choose_alpha(sweep, floor, 1.5)
    assert alpha == 16 and "FID <= 1.5 x unsteered (225.0)" in rule and "FID 210.0" in rule
    unmeasured = sweep.assign(FID=float("nan"))
    assert choose_alpha(unmeasured, floor, 1.5)[0] == 32  # nothing to weigh


def test_a_weak_selection_is_pushed_past_the_grid_until_it_costs_fidelity():
    from icm.steering.calibration import alpha_sweep

    def measure(fidelity_per_alpha):
        return lambda alpha: {"alpha": alpha, "CLIP-I": 1.0 - fidelity_per_alpha * alpha}

    floor = cosine_floor(0.8)
    weak = alpha_sweep([2, 4], floor, 3, measure(0.01))  # CLIP-I 0.96 at 4: double on
    assert [r["alpha"] for r in weak] == [0, 2, 4, 8, 16, 32]  # three doublings at most
    stops = alpha_sweep([2, 4], floor, 3, measure(0.02))  # 0.84 at 8, 0.68 at 16: stop there
    assert [r["alpha"] for r in stops] == [0, 2, 4, 8, 16]
    strong = alpha_sweep([2, 4], floor, 3, measure(0.1))  # the grid already crosses the floor
    assert [r["alpha"] for r in strong] == [0, 2, 4]
    assert [r["alpha"] for r in alpha_sweep([2, 4], floor, 0, measure(0.01))] == [0, 2, 4]


def test_spread_units_scale_each_row_by_its_site_and_step(tmp_path):
    from icm.steering.plan import scale_by_spread

    meta = tmp_path / "directions.json"
    entries = [{"site": s, "step": t, "spread": (1 + t) * (10 if s == "b" else 1)}
               for s in ("a", "b") for t in range(3)]
    meta.write_text(json.dumps({"entries": entries}))
    unit = np.eye(3, 4, dtype=np.float32)
    scaled = scale_by_spread({"red-green": {"a": unit, "b": unit}}, [("red", "green")], [meta])
    np.testing.assert_allclose(np.linalg.norm(scaled["red-green"]["a"], axis=1), [1, 2, 3])
    np.testing.assert_allclose(np.linalg.norm(scaled["red-green"]["b"], axis=1), [10, 20, 30])
    meta.write_text(json.dumps({"entries": [{"site": "a", "step": 0}]}))
    with pytest.raises(ValueError, match="refit the probes"):
        scale_by_spread({"red-green": {"a": unit}}, [("red", "green")], [meta])


def test_one_vector_is_the_unit_mean_of_the_window_at_every_step():
    """Appendix G's option: every row is the normalised mean of the K rows from the start."""
    from icm.steering.plan import one_vector

    rows = np.zeros((6, 3), dtype=np.float32)
    rows[:, 0] = 1.0  # steps 0, 1 point along x; steps 2-3 along y; 4-5 along z
    rows[2:4] = [0, 1, 0]
    rows[4:] = [0, 0, 1]
    one = one_vector(rows, start=1, steps=2, site="a")  # steps 1 (x) and 2 (y)
    assert one.shape == rows.shape and one.dtype == rows.dtype
    np.testing.assert_allclose(one, np.tile([2**-0.5, 2**-0.5, 0], (6, 1)), rtol=1e-6)
    np.testing.assert_allclose(one_vector(rows, 2, 2, "a"), np.tile([0, 1, 0], (6, 1)))
    with pytest.raises(ValueError, match="a: direction_steps 3 from the start step 4 needs 7"):
        one_vector(rows, 4, 3, "a")
    rows[3] = [0, -1, 0]
    with pytest.raises(ValueError, match="cancel out"):
        one_vector(rows, 2, 2, "a")


def test_nonfinite_or_misshapen_directions_are_refused_naming_pair_site_and_step():
    from icm.steering.plan import check_vectors

    good = np.ones((3, 4), dtype=np.float32)
    check_vectors({"red-green": {"a": good}}, np.arange(3.0), "spread")
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"red-green direction of a is NaN or inf at steps \[2\]"):
        check_vectors({"red-green": {"a": bad}}, np.arange(3.0), "spread")
    with pytest.raises(ValueError, match="has 3 steps but its probes list 4"):
        check_vectors({"red-green": {"a": good}}, np.arange(4.0), "absolute")


def test_an_explicit_plan_steers_each_target_with_its_sites_and_signed_strength(tmp_path):
    """The paper's Table 6 as a plan: woman -10 and man +10 along woman-man's unit direction
    at the listed sites from step 2; a site the probes lack is refused, naming it."""
    from safetensors.numpy import save_file

    from icm.steering.plan import explicit_text, plan_steering

    rng = np.random.default_rng(0)
    rows = {s: rng.standard_normal((4, 6)).astype(np.float32) for s in ("a", "b", "c")}
    save_file(rows, str(tmp_path / "directions.safetensors"))
    (tmp_path / "directions.json").write_text(json.dumps(
        {"pair": "woman-man", "timesteps": [999.0, 750.0, 500.0, 250.0], "entries": []}))
    concept = {"classes": ["woman", "man"], "pairs": [["woman", "man"]],
               "steering": {"target_probs": None}}
    targets = {"woman": {"sites": ["a", "c"], "alpha": -10}, "man": {"sites": ["b"], "alpha": 10}}
    # step 25 of 50 is timestep 500: step 2 of these four
    variant = {"sites": "explicit", "seed": 0, "explicit": {"start_step": 25, "targets": targets}}
    files = ([tmp_path / "directions.safetensors"], [tmp_path / "directions.json"])
    plan = plan_steering(concept, variant, None, None, *files, None)
    assert plan.start_step == 2 and plan.alpha_unit == "absolute"
    assert "step 25 of 50" in plan.start_rule and "timestep 500" in plan.start_rule
    vectors, strength = plan.push_for("woman", alpha=1.0)
    assert strength == -10 and sorted(vectors) == ["a", "c"]
    np.testing.assert_array_equal(vectors["a"], rows["a"])  # the sign is in the strength
    vectors, strength = plan.push_for("man", alpha=1.0)
    assert strength == 10 and list(vectors) == ["b"]
    assert plan.sites_by_target() == {"woman": ["a", "c"], "man": ["b"]}
    assert explicit_text(plan.explicit) == "woman -10; man 10"
    targets["man"]["sites"] = ["up_blocks.9.attn1"]
    with pytest.raises(ValueError, match=r"explicit sites \['up_blocks.9.attn1'\] .* its sites "
                                         r"are: a, b, c"):
        plan_steering(concept, variant, None, None, *files, None)
    targets["man"]["sites"] = ["b"]
    # The paper's step 15 of 50 is timestep 681: step 16 of PNDM's 51-step loop, whose step
    # 15 is timestep 701 (a raw index would start one step early there).
    pndm = [981] + [981 - 20 * i for i in range(50)]  # PNDM repeats its first timestep
    rows = {s: rng.standard_normal((51, 6)).astype(np.float32) for s in ("a", "b", "c")}
    save_file(rows, str(tmp_path / "directions.safetensors"))
    (tmp_path / "directions.json").write_text(json.dumps(
        {"pair": "woman-man", "timesteps": pndm, "num_train_timesteps": 1000, "entries": []}))
    variant["explicit"]["start_step"] = 15
    plan = plan_steering(concept, variant, None, None, *files, None)
    assert pndm[15] == 701 and plan.start_step == 16 and pndm[16] == 681
