"""Prompt injection: another prompt's text at one cross-attention site (the localization
baseline of "Attention, May I Have Your Decision? Localizing Generative Choices in Diffusion
Models", section 4.5 and appendix H; after "On Mechanistic Knowledge Localization in
Text-to-Image Generative Models", Basu et al., ICML 2024).

Two hook contexts over :class:`icm.hooks.registry.SiteHooks`, both on the inputs a cross-attention
module receives (``encoder_hidden_states`` and, where the family passes one, its
``attention_mask``), conditional rows only:

* :class:`TextStates` records them during a run with the injected prompt. They are what the
  site sees after any text projection of the family (SANA's caption projection), so
  injection needs no family branch;
* :class:`PromptInjection` replaces them at the chosen site(s) during the general prompt's
  run, at every step; every other site, and the unconditional rows, keep the general
  prompt's text.

The text states do not depend on the step, so the recording runs one denoising step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from icm.hooks.registry import CFGMode, SiteHooks

#: The keyword inputs of a cross-attention module that carry the text.
TEXT_INPUTS = ("encoder_hidden_states", "attention_mask")


def _text_inputs(site: str, kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    states = kwargs.get("encoder_hidden_states")
    if not isinstance(states, torch.Tensor):
        raise RuntimeError(f"{site} got no encoder_hidden_states keyword: not a "
                           "cross-attention site, nothing to inject")
    found = {"encoder_hidden_states": states}
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] == states.shape[0]:
        found["attention_mask"] = mask
    return found


class TextStates(SiteHooks):
    """Records each site's conditional text inputs at step 0 (``states[site][name]``, the
    rows of one prompt: run it with a batch of one)."""

    purpose = "record-text"
    replaces_inputs = True

    def __init__(self, pipe: Any, sites: Sequence[str], cfg: CFGMode = "auto") -> None:
        super().__init__(pipe, sites, cfg)
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def on_inputs(self, site: str, step: int, args: tuple, kwargs: dict) -> None:
        if step == 0:
            found = _text_inputs(site, kwargs)
            rows = self.cond_slice(found["encoder_hidden_states"].shape[0])
            self.states[site] = {k: v[rows][:1].detach().clone() for k, v in found.items()}
        return None


class PromptInjection(SiteHooks):
    """Replaces the conditional rows of each site's text inputs with recorded ones."""

    purpose = "inject"
    replaces_inputs = True

    def __init__(self, pipe: Any, states: Mapping[str, Mapping[str, torch.Tensor]],
                 cfg: CFGMode = "auto") -> None:
        super().__init__(pipe, list(states), cfg)
        self.injected = {site: dict(v) for site, v in states.items()}

    def on_inputs(self, site: str, step: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        found = _text_inputs(site, kwargs)
        rows = self.cond_slice(found["encoder_hidden_states"].shape[0])
        replaced = dict(kwargs)
        for name, value in found.items():
            new = self.injected[site].get(name)
            if new is None:
                continue
            if new.shape[1:] != value.shape[1:]:
                raise RuntimeError(f"{site}: the injected {name} has shape "
                                   f"{tuple(new.shape[1:])}, the general prompt's "
                                   f"{tuple(value.shape[1:])}")
            value = value.clone()
            value[rows] = new.to(value.device, value.dtype)
            replaced[name] = value
        return args, replaced


def record_text_states(pipe: Any, prompt: str, sites: Sequence[str],
                       call: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Each site's text inputs for ``prompt``, from a one-step run of ``pipe`` with the
    call arguments ``call`` (guidance, resolution: those of the runs it is injected into)."""
    with TextStates(pipe, sites) as recorder:
        pipe(prompt=[prompt], num_inference_steps=1,
             **{k: v for k, v in call.items() if k != "num_inference_steps"})
    missing = sorted(set(sites) - set(recorder.states))
    if missing:
        raise RuntimeError(f"sites {missing} never ran during the recording of {prompt!r}")
    return recorder.states


