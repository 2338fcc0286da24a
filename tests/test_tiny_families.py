"""Capture and steering on the tiny replicas of the other families, read through the family
table: the same guarantees as SD1.5's (tests/test_capture.py, tests/test_steering.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icm.capture import capture_activations
from icm.families import FAMILIES, site_width
from icm.hooks import SiteHooks
from icm.sites import denoiser_of, list_sites, output_tensor
from icm.steering import steer_activations

PROMPTS = ["a photo of a person", "a portrait of a woman"]
STEPS = 3


# Per family: how the tests call the tiny pipeline (FLUX.1-dev: its guidance embedding).
CALLS = {"sdxl": {"height": 32, "width": 32, "guidance_scale": 5.0},
         "flux": {"height": 16, "width": 16, "guidance_scale": 3.5, "max_sequence_length": 16}}


@pytest.fixture(scope="module", params=sorted(CALLS))
def family_pipe(request):
    from icm.models.tiny_flux import build_tiny_flux
    from icm.models.tiny_sdxl import build_tiny_sdxl

    pipe = {"sdxl": build_tiny_sdxl, "flux": build_tiny_flux}[request.param](seed=0)
    pipe.icm_test_family = request.param
    return pipe


def run(pipe):
    generator = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=STEPS, generator=generator, output_type="np",
                **CALLS[pipe.icm_test_family]).images


def conditional_rows(pipe, rows):
    """The conditional rows of a denoiser batch, as the family table lays guidance out."""
    return slice(0, rows) if FAMILIES[pipe.icm_test_family].guidance == "embedded" \
        else slice(rows // 2, rows)


class RowMeans(SiteHooks):
    """Token mean of every row of a site's image stream at every step, as a plain hook."""

    purpose = "record"

    def __init__(self, pipe, sites):
        super().__init__(pipe, sites, cfg="all")
        self.means = {s: [] for s in self.sites}

    def on_output(self, site, step, output):
        self.means[site].append(output_tensor(output, site).mean(dim=1).detach().clone())


def test_capture_records_the_conditional_means_and_changes_no_pixel(family_pipe):
    sites = list_sites(denoiser_of(family_pipe))
    plain = run(family_pipe)
    with capture_activations(family_pipe, sites) as capture, RowMeans(family_pipe, sites) as raw:
        captured = run(family_pipe)
        batch = capture.pop()
    np.testing.assert_array_equal(captured, plain)  # bit-identical with capture on
    for site in sites:
        rows = torch.stack(raw.means[site], dim=1)  # (rows, steps, C)
        cond = conditional_rows(family_pipe, rows.shape[0])
        assert rows[cond].shape[0] == len(PROMPTS)
        np.testing.assert_allclose(batch.activations[site], rows[cond].numpy(),
                                   rtol=1e-6, atol=1e-6)
    # steps are the scheduler's, in its units (FLUX's transformer is given t / 1000)
    np.testing.assert_allclose(batch.timesteps, family_pipe.scheduler.timesteps.numpy(),
                               rtol=1e-5)


def test_steering_is_the_identity_at_zero_and_alpha_v_on_conditional_rows(family_pipe):
    denoiser = denoiser_of(family_pipe)
    sites = list_sites(denoiser)
    rng = np.random.default_rng(0)
    directions = {}
    for site in sites:  # random directions: a constant vector is removed by LayerNorm
        v = rng.standard_normal((STEPS, site_width(denoiser, site))).astype(np.float32)
        directions[site] = v / np.linalg.norm(v, axis=1, keepdims=True)
    plain = run(family_pipe)
    with steer_activations(family_pipe, directions, alpha=0.0, start_step=0):
        np.testing.assert_array_equal(run(family_pipe), plain)
    site, t0, alpha = sites[0], 1, 3.0
    with RowMeans(family_pipe, [site]) as before:
        run(family_pipe)
    with (steer_activations(family_pipe, {site: directions[site]}, alpha, t0),
          RowMeans(family_pipe, [site]) as after):
        moved = run(family_pipe)
    assert np.abs(moved - plain).max() > 1e-4
    torch.testing.assert_close(after.means[site][0], before.means[site][0], rtol=0, atol=0)
    shift = after.means[site][t0] - before.means[site][t0]
    cond = conditional_rows(family_pipe, shift.shape[0])
    expected = alpha * torch.as_tensor(directions[site][t0])
    torch.testing.assert_close(shift[cond], expected.expand_as(shift[cond]), rtol=0, atol=1e-5)
    others = torch.ones(shift.shape[0], dtype=torch.bool)
    others[cond] = False
    assert others.sum() == 0 or shift[others].abs().max() == 0


def test_a_saved_replica_loads_back_through_the_real_loading_code(family_pipe, tmp_path):
    from icm.models import ModelSpec, load_pipeline
    from icm.models.tiny_flux import save_tiny_flux
    from icm.models.tiny_sdxl import save_tiny_sdxl

    family = family_pipe.icm_test_family
    folder = {"sdxl": save_tiny_sdxl, "flux": save_tiny_flux}[family](tmp_path / family)
    loaded = load_pipeline(ModelSpec(name=f"tiny-{family}", family=family, dtype="float32",
                                     source=str(folder)), device="cpu")
    assert type(loaded) is type(family_pipe)
    loaded.icm_test_family = family
    np.testing.assert_array_equal(run(loaded), run(family_pipe))
