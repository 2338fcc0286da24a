"""Prompt injection: the text of one cross-attention site replaced, conditional rows only;
flip rates and the injection ranking."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from icm.hooks.injection import PromptInjection, record_text_states
from icm.hooks.registry import DoubleHookError
from icm.hooks.sites import denoiser_of, list_sites
from icm.jobs.injection import rank_injection_job
from icm.probing.injection import flip_table, injected_prompts

CALL = {"num_inference_steps": 4, "height": 32, "width": 32, "guidance_scale": 7.5}


def run(pipe, prompt, seed=0):
    return pipe([prompt], generator=[torch.Generator("cpu").manual_seed(seed)],
                output_type="np", **CALL).images


def cross_sites(pipe):
    return list_sites(denoiser_of(pipe), ["attn2"])


def test_injecting_a_prompt_into_itself_changes_nothing_and_another_prompt_does(tiny_pipe):
    site = cross_sites(tiny_pipe)[0]
    plain = run(tiny_pipe, "a photo of a person")
    same = record_text_states(tiny_pipe, "a photo of a person", [site], CALL)
    with PromptInjection(tiny_pipe, same):
        np.testing.assert_array_equal(run(tiny_pipe, "a photo of a person"), plain)
    other = record_text_states(tiny_pipe, "a red car on a street", [site], CALL)
    with PromptInjection(tiny_pipe, other):
        injected = run(tiny_pipe, "a photo of a person")
    assert np.abs(injected - plain).max() > 1e-3
    np.testing.assert_array_equal(run(tiny_pipe, "a photo of a person"), plain)  # removed


def test_only_the_conditional_rows_of_the_chosen_site_get_the_other_text(tiny_pipe):
    first, second = cross_sites(tiny_pipe)[:2]
    seen: dict[str, list[torch.Tensor]] = {first: [], second: []}
    modules = dict(denoiser_of(tiny_pipe).named_modules())

    def spy(site):
        def hook(module, args, kwargs):
            seen[site].append(kwargs["encoder_hidden_states"].detach().clone())
        return hook

    other = record_text_states(tiny_pipe, "a red car on a street", [first], CALL)
    with PromptInjection(tiny_pipe, other):  # registered first: the spies see its output
        handles = [modules[s].register_forward_pre_hook(spy(s), with_kwargs=True)
                   for s in (first, second)]
        try:
            run(tiny_pipe, "a photo of a person")
        finally:
            for handle in handles:
                handle.remove()
    injected = other[first]["encoder_hidden_states"][0]
    for step_states in seen[first]:  # [uncond, cond], every step
        torch.testing.assert_close(step_states[1], injected, rtol=0, atol=0)
        torch.testing.assert_close(step_states[0], seen[second][0][0], rtol=0, atol=0)
    assert len(seen[first]) == CALL["num_inference_steps"]
    for step_states in seen[second]:  # the other site keeps the general prompt's text
        assert not torch.equal(step_states[1], injected)


def test_injection_hooks_are_exclusive_and_always_removed(tiny_pipe):
    site = cross_sites(tiny_pipe)[0]
    states = record_text_states(tiny_pipe, "a red car", [site], CALL)
    with PromptInjection(tiny_pipe, states):
        with pytest.raises(DoubleHookError):
            with PromptInjection(tiny_pipe, states):
                pass
    with pytest.raises(RuntimeError, match="no encoder_hidden_states"):
        self_site = [s for s in list_sites(denoiser_of(tiny_pipe)) if s.endswith("attn1")][0]
        record_text_states(tiny_pipe, "a red car", [self_site], CALL)
    unet = denoiser_of(tiny_pipe)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_injected_prompts_fall_back_on_the_first_specific_prompt():
    concept = {"classes": ["woman", "man"], "injection": {"injected": {"man": "image of a man"}},
               "specific_prompts": {"woman": ["a photo of a woman", "a woman"]}}
    assert injected_prompts(concept) == {"woman": "a photo of a woman", "man": "image of a man"}
    with pytest.raises(ValueError, match=r"no prompt to inject for \['man'\]"):
        injected_prompts({**concept, "injection": {"injected": None}})


def _injection_world():
    """Two prompts x two seeds; two sites x two classes. Site s0 flips every eligible image
    to the injected class, s1 never does."""
    rows, labels = [], []
    before = {(0, 0): "a", (0, 1): "b", (1, 0): "a", (1, 1): "a"}
    for site in ("", "s0", "s1"):
        for name in ([""] if not site else ["a", "b"]):
            for (prompt, repeat), label in before.items():
                rows.append({"sample": len(rows), "prompt_index": prompt, "repeat": repeat,
                             "site": site, "injected_class": name})
                labels.append(name if site == "s0" else label)
    samples = pd.DataFrame(rows)
    return samples, pd.DataFrame({"sample": samples["sample"], "label": labels})


def test_flip_rates_count_only_images_that_were_another_class():
    samples, labels = _injection_world()
    flips = flip_table(samples, labels).set_index(["site", "injected_class"])
    # Class a: one of four seeds was b (eligible); class b: three were a.
    assert flips.loc[("s0", "a"), "eligible"] == 1 and flips.loc[("s0", "a"), "flips"] == 1
    assert flips.loc[("s0", "b"), "eligible"] == 3 and flips.loc[("s0", "b"), "flips"] == 3
    assert (flips.xs("s0")["flip_rate"] == 1).all() and (flips.xs("s1")["flip_rate"] == 0).all()
    assert flips.loc[("s1", "a"), "share_class"] == 0.75  # a stays a: no flip, but class a


def test_the_injection_ranking_is_compared_with_the_probes(tmp_path):
    samples, labels = _injection_world()
    samples.to_csv(tmp_path / "samples.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({"site": ["s1", "s0", "x"], "rank": [1, 2, 3],
                  "mean_test_acc": [0.9, 0.6, 0.5]}).to_csv(tmp_path / "ranking.csv", index=False)
    out = tmp_path / "out"
    out.mkdir()
    rank_injection_job(tmp_path / "samples.csv", tmp_path / "labels.csv",
                       tmp_path / "ranking.csv", out / "flips.csv", out / "ranking.csv",
                       out / "correlation.json", out / "plot.png")
    ranking = pd.read_csv(out / "ranking.csv")
    assert list(ranking["site"]) == ["s0", "s1"] and list(ranking["injection_rank"]) == [1, 2]
    assert list(ranking["probe_rank"]) == [2, 1]
    record = json.loads((out / "correlation.json").read_text())
    assert record["top_by_injection"][0] == "s0" and record["top_by_probes"][0] == "s1"
    assert (out / "plot.png").exists()
    pd.DataFrame({"site": ["s0"], "rank": [1], "mean_test_acc": [0.9]}).to_csv(
        tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match=r"does not rank the injected sites \['s1'\]"):
        rank_injection_job(tmp_path / "samples.csv", tmp_path / "labels.csv",
                           tmp_path / "other.csv", out / "f.csv", out / "r.csv",
                           out / "c.json", out / "p.png")
