"""The family table: full-size site lists (golden counts), kinds, image streams, selection."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
import torch

from icm.cli import describe_sites
from icm.models.configs import DENOISER_CONFIGS
from icm.models.families import FAMILIES, image_stream, kind_of, replace_image_stream
from icm.models.meta import denoiser_on_meta, site_table
from icm.steering.selection import select_sites

GOLDEN = {  # the papers' and the public configs' counts, and the UNets' one bottleneck
    "sd15": ({"attn1": 16, "attn2": 16, "h-space": 1}, {320, 640, 1280}),
    "sdxl": ({"attn1": 70, "attn2": 70, "h-space": 1}, {640, 1280}),
    "sana": ({"attn1": 20, "attn2": 20}, {2240}),
    "flux": ({"double": 19, "single": 38}, {3072}),
}


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_full_size_site_lists_on_the_meta_device(family):
    rows = site_table(denoiser_on_meta(DENOISER_CONFIGS[family]()))
    counts, widths = GOLDEN[family]
    assert Counter(r["kind"] for r in rows) == counts
    assert {r["width"] for r in rows} == widths
    groups = [r["site"].split(".", 1)[0] for r in rows]
    order = FAMILIES[family].order
    if order:  # forward order: each group's sites together, groups in the family's order
        seen = list(dict.fromkeys(groups))
        assert seen == [g for g in order if g in seen]


def test_sdxl_sites_run_down_mid_up_as_the_data_flows():
    sites = [r["site"] for r in site_table(denoiser_on_meta(DENOISER_CONFIGS["sdxl"]()))]
    assert sites[0] == "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert sites[-1] == "up_blocks.1.attentions.2.transformer_blocks.1.attn2"
    mid = [i for i, s in enumerate(sites) if s.startswith("mid_block")]
    assert len(mid) == 21 and sites[mid[0] - 1].startswith("down_blocks.2")
    assert sites[mid[-1]] == "mid_block"  # the bottleneck returns after its attention


def test_kinds_and_image_streams():
    assert kind_of("transformer_blocks.3").name == "double"
    assert kind_of("single_transformer_blocks.3").name == "single"
    assert kind_of("transformer_blocks.3.attn1").name == "attn1"  # SANA
    with pytest.raises(ValueError, match="no site"):
        kind_of("transformer_blocks.3.ff", FAMILIES["sana"])
    text, image = torch.zeros(2, 3, 4), torch.ones(2, 5, 4)
    assert image_stream("transformer_blocks.0", (text, image)) is image  # FLUX: (text, image)
    joint = (image, text)  # joint attention returns (image, text)
    assert image_stream("transformer_blocks.0.attn1", joint) is image
    swapped = replace_image_stream("single_transformer_blocks.1", (text, image), image * 2)
    assert swapped[0] is text and torch.equal(swapped[1], image * 2)


def test_flux_selections_choose_among_block_outputs():
    ranking = pd.DataFrame({
        "site": ["transformer_blocks.0", "single_transformer_blocks.0", "transformer_blocks.1"],
        "kind": ["double", "single", "double"], "rank": [1, 2, 3],
        "block": ["transformer_blocks.0", "single_transformer_blocks.0",
                  "transformer_blocks.1"]})
    assert select_sites(ranking, "top", 2) == ["transformer_blocks.0",
                                               "single_transformer_blocks.0"]
    assert select_sites(ranking, "worst", 1) == ["transformer_blocks.1"]
    with pytest.raises(ValueError, match="cross-attention"):
        select_sites(ranking, "cross", 1)  # FLUX has none


def test_the_sites_command_reads_configs_and_local_folders():
    sdxl = describe_sites("sdxl")
    assert "70 attn1 (self-attention), 70 attn2 (cross-attention)" in sdxl
    assert "guidance   embedded" in describe_sites("flux")
    toy = describe_sites("toy")  # the committed folder's config
    assert "resources/models/toy/unet/config.json" in toy and "7 attn1" in toy
    # A diffusers folder names its family by its pipeline class (docs/families.md).
    folder = describe_sites("resources/models/toy")
    assert "(family toy," in folder and "7 attn1" in folder and "1 h-space" in folder
    # An unknown name is told which names would do: the config's models and the families.
    with pytest.raises(ValueError, match="no model of config.yaml .*tiny-flux.*no family"):
        describe_sites("no-such-model")


def test_embedded_guidance_keeps_every_row_conditional():
    from torch import nn

    from icm.hooks.registry import SiteHooks

    def pipe_with(class_name):
        denoiser = type(class_name, (nn.Module,), {})()
        denoiser.transformer_blocks = nn.ModuleList([nn.Linear(2, 2)])
        return type("Pipe", (), {"transformer": denoiser, "do_classifier_free_guidance": True})()

    flux = SiteHooks(pipe_with("FluxTransformer2DModel"), ["transformer_blocks.0"])
    assert flux.cond_slice(4) == slice(0, 4)  # FLUX.1-dev: no [uncond, cond] batch
    sana = SiteHooks(pipe_with("SanaTransformer2DModel"), ["transformer_blocks.0"])
    assert sana.cond_slice(4) == slice(2, 4)  # batched guidance: the second half


def test_the_configured_hand_picked_sites_exist_in_the_full_size_models():
    """config.yaml's `explicit` sites (the paper's Table 6 for SD1.5) are module paths of the
    full-size denoiser, a family's own kind each: a misspelt path fails here, not on a GPU."""
    import yaml

    from icm.models.families import family_named

    config = yaml.safe_load(open("config.yaml"))
    checked = 0
    for concept, spec in config["concepts"].items():
        for model, chosen in (spec.get("steering") or {}).get("explicit", {}).items():
            family = config["models"][model]["family"]
            if config["models"][model].get("builder"):
                continue  # a tiny replica: the workflow tests check its names
            sites = {r["site"] for r in site_table(denoiser_on_meta(DENOISER_CONFIGS[family]()))}
            for target, entry in chosen["targets"].items():
                missing = set(entry["sites"]) - sites
                assert not missing, (concept, model, target, missing)
                kinds = {kind_of(s, family_named(family)).name for s in entry["sites"]}
                assert kinds <= set(family_named(family).steer_kinds), (concept, target)
                checked += len(entry["sites"])
            assert chosen["start_step"] < config["models"][model]["steps"]
    assert checked >= 20  # gender, age and race: Table 6's 22 site entries
