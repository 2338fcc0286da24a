"""Head relevance: HRV voting, the mask oracle and label-free signals, on planted maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icm.head_maps.relevance import (
    ConceptVoting,
    agreement,
    concentration,
    hrv_from_votes,
    oracle_iou,
    rank_stability,
    voting_sequences,
)


def planted_maps(images=3, size=8, seed=0):
    """Two sites of 4 heads, one word slot: site a's head 2 holds a square, the rest noise."""
    rng = np.random.default_rng(seed)
    square = np.zeros((size, size))
    square[2:6, 2:6] = 1.0
    maps = {s: rng.random((images, 4, 1, size, size)) * 0.2 for s in ("a.attn2", "b.attn2")}
    maps["a.attn2"][:, 2, 0] += square * 3
    masks = np.repeat(np.kron(square, np.ones((2, 2)))[None].astype(bool), images, axis=0)
    return maps, masks


def test_label_free_signals_and_the_oracle_find_the_planted_head():
    maps, masks = planted_maps()
    for score in (concentration(maps, 0), agreement(maps, 0), oracle_iou(maps, 0, masks)):
        assert score.shape == (8,) and int(np.argmax(score)) == 2
    assert oracle_iou(maps, 0, masks)[2] > 0.9
    other = planted_maps(seed=1)[0]
    stability = rank_stability(np.stack([concentration(maps, 0), concentration(other, 0)]))
    assert stability[2] == pytest.approx(1.0)  # first in both seed groups


def test_hrv_rows_average_one_and_follow_the_votes():
    votes = np.array([[9, 1], [5, 5], [0, 10]], dtype=float)  # (heads, concepts)
    relevance = hrv_from_votes(votes)
    assert relevance.shape == (2, 3)
    np.testing.assert_allclose(relevance.mean(axis=1), 1.0)
    assert np.argmax(relevance[0]) == 0 and np.argmax(relevance[1]) == 2
    assert voting_sequences({"color": ["red", "blue"], "shape": ["circle"]}) == \
        [["red", "circle"], ["blue", "circle"]]


def test_concept_voting_counts_one_vote_per_head_image_and_step_as_hrv(tiny_pipe):
    """HRV's voting: each word encoded on its own, the sequence the start token and one drawn
    word per concept (no end or padding token), one vote per head, image and step; the
    draws are seeded (same seed, same votes)."""
    concepts = {"color": ["red", "blue"], "shape": ["circle", "square"]}
    steps, images = 2, 2

    def votes(seed):
        with ConceptVoting(tiny_pipe, concepts, seed=seed) as voting:
            generator = [torch.Generator("cpu").manual_seed(i) for i in range(images)]
            tiny_pipe(["a photo"] * images, num_inference_steps=steps, height=32, width=32,
                      generator=generator, output_type="np")
            return voting, *voting.relevance()

    voting, heads, relevance = votes(0)
    for counts in voting.votes.values():  # (heads, concepts)
        np.testing.assert_array_equal(counts.sum(dim=1).numpy(), images * steps)
    assert relevance.shape == (2, len(heads))
    np.testing.assert_allclose(relevance.mean(axis=1), 1.0, rtol=1e-6)
    context, weights = voting.sequence()
    assert context.shape[1] == 1 + int((weights > 0).sum())  # start token + drawn words
    np.testing.assert_array_equal(weights.sum(dim=0).numpy(), [1.0, 1.0])
    assert weights[0].sum() == 0  # the start token votes for no concept
    # the word's own encoding: "blue" alone, whatever word came before it in a sentence
    from icm.head_maps.relevance import encode_texts

    alone = encode_texts(tiny_pipe, ["blue"])[0, 1]
    assert any(torch.equal(alone, w[0]) for w in voting.words[0])
    again = votes(0)[0]
    assert all(torch.equal(again.votes[s], voting.votes[s]) for s in voting.votes)


def test_evaluation_rows_compare_each_method_with_all_on_the_same_images():
    from icm.head_maps.aggregation import iou
    from icm.head_maps.evaluation import POOLED, evaluate_split

    maps, masks = planted_maps(images=12)
    decoy = np.zeros((8, 8))
    decoy[0:3, 5:8] = 1.0  # other heads look elsewhere: the all-head map spreads
    maps["b.attn2"][:, :, 0] += decoy
    truth = {("a.attn2", 2): 1.0}
    relevance = {(s, h): float((s, h) in truth) for s in maps for h in range(4)}
    prompts = np.arange(12) // 3  # 4 prompts of 3 images
    rows = evaluate_split(maps, masks[:, None], np.ones((12, 1), bool), prompts, ["shape"],
                          "held-out", {"oracle": {"shape": relevance}}, ks=[1, 1.0],
                          taus=[0.4])
    by = {(r["word"], r["method"], r["relevance"], r["k"]): r for r in rows}
    assert {key[1:] for key in by} == {("all", "none", 8), ("random-k", "random", 1),
                                       ("topk", "oracle", 1), ("bottom-k", "oracle", 1),
                                       ("random-k", "random", 8), ("topk", "oracle", 8),
                                       ("bottom-k", "oracle", 8)}
    top, everything = by["shape", "topk", "oracle", 1], by["shape", "all", "none", 8]
    assert top["miou"] > 0.9 and top["miou"] > everything["miou"]
    assert top["diff_low"] > 0  # the paired interval, over prompts, excludes zero
    assert by["shape", "bottom-k", "oracle", 1]["miou"] < everything["miou"]
    # k = 1.0 is every head (a fraction), k = 1 one head (a count)
    assert by["shape", "topk", "oracle", 8]["miou"] == pytest.approx(everything["miou"])
    for row in rows:
        assert row["miou_low"] <= row["miou"] <= row["miou_high"] and row["n"] == 12
    # one word: the pooled rows are that word's
    assert by[POOLED, "topk", "oracle", 1]["miou"] == top["miou"]
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0  # DAAM's convention


def test_pooled_rows_count_only_annotated_pairs_and_intervals_resample_prompts():
    """Two word slots, one annotated on half the images: each word scores its own images,
    pooled rows every annotated (image, word) pair; non-square masks; a prompt-level
    interval is wider than an image-level one when prompts differ."""
    from icm.head_maps.evaluation import POOLED, bootstrap, evaluate_split

    maps, masks = planted_maps(images=8)
    maps = {s: np.concatenate([m, m[:, :, :1] * 0.5], axis=2) for s, m in maps.items()}
    wide = np.pad(masks, ((0, 0), (0, 0), (0, 4)))  # 16 x 20 images
    annotated = np.ones((8, 2), bool)
    annotated[4:, 1] = False
    rows = evaluate_split(maps, np.stack([wide, wide], axis=1), annotated, np.arange(8) // 2,
                          ["shape", "color"], "held-out", {}, ks=[2], taus=[0.4])
    n = {(r["word"], r["method"]): r["n"] for r in rows}
    assert n["shape", "all"] == 8 and n["color", "all"] == 4 and n[POOLED, "all"] == 12
    values = np.repeat([0.1, 0.9, 0.2, 0.8], 5)
    prompts = np.repeat(np.arange(4), 5)
    by_prompt = bootstrap(values, groups=prompts)
    by_image = bootstrap(values)
    assert by_prompt[1] - by_prompt[0] > by_image[1] - by_image[0]


def test_the_fast_scorer_equals_aggregate_segment_and_iou_image_by_image():
    from icm.head_maps.aggregation import aggregate, chosen_heads, iou, segment
    from icm.head_maps.evaluation import WordScorer

    maps, masks = planted_maps(images=5, seed=3)
    rng = np.random.default_rng(1)
    relevance = {(s, h): float(rng.random()) for s in maps for h in range(4)}
    scorer = WordScorer(maps, 0, masks)
    for k, tau in ((3, 0.4), (0.5, 0.3)):
        direct = aggregate(maps, "topk", relevance, k)
        expected = [iou(segment(direct[i, 0], masks.shape[-1], tau), masks[i])
                    for i in range(len(masks))]
        chosen = chosen_heads(scorer.heads, relevance, k)
        np.testing.assert_allclose(scorer.ious(chosen, tau), expected)
    everything = aggregate(maps, "all")
    np.testing.assert_allclose(
        scorer.ious(None, 0.4),
        [iou(segment(everything[i, 0], 16, 0.4), masks[i]) for i in range(len(masks))])
    curve = scorer.curve(relevance, [1, 8], 0.4)
    assert curve["most"][-1] == pytest.approx(curve["least"][-1])  # all heads either way


def test_the_oracle_scores_heads_block_by_block_as_all_at_once(monkeypatch):
    """Bounded memory: with blocks of one head the oracle's scores are those of one pass."""
    import icm.head_maps.relevance as relevance

    maps, masks = planted_maps(images=4, seed=2)
    whole = oracle_iou(maps, 0, masks)
    monkeypatch.setattr(relevance, "ORACLE_BLOCK_BYTES", 1)
    np.testing.assert_array_equal(relevance.oracle_iou(maps, 0, masks), whole)


def test_published_hrv_vectors_map_to_the_sites_in_hrv_s_head_order(tmp_path):
    """A synthetic file of the shape HRV ships for SD1.4/1.5 (34 concepts x 128 heads, its
    columns named "down, layer: l, head: h" in its own order: down, up, mid) is read in the
    study's site order: a planted head of one concept comes out at its site, and a file of
    another model's heads is refused."""
    from icm.head_maps.relevance import hrv_head_names, published_hrv
    from icm.hooks.head_maps import word_map_sites
    from icm.models.configs import sd15_unet_config
    from icm.models.meta import denoiser_on_meta

    sites = word_map_sites(denoiser_on_meta(sd15_unet_config()))
    heads = [(s, h) for s in sites for h in range(8)]
    assert len(heads) == 128
    places = {"down": 6, "up": 9, "mid": 1}  # HRV's 16 layers of SD1.x
    names = [f"{place}, layer: {layer}, head: {h}" for place in ("down", "up", "mid")
             for layer in range(places[place]) for h in range(8)]
    assert sorted(hrv_head_names(sites, heads)) == sorted(names)
    concepts = [f"concept {i}" for i in range(33)] + ["Animals"]
    table = np.random.default_rng(0).random((34, 128)) * 0.1
    planted = names.index("up, layer: 4, head: 3")  # the 5th up-block attn2, head 3
    table[33, planted] = 5.0
    np.save(tmp_path / "vectors.npy", table)
    np.save(tmp_path / "index.npy", np.array(names))
    got = published_hrv(tmp_path / "vectors.npy", tmp_path / "index.npy", concepts,
                        {"animal": "Animals"}, sites, heads)
    assert got.shape == (1, 128)
    up_sites = [s for s in sites if s.startswith("up_blocks")]
    assert heads[int(np.argmax(got[0]))] == (up_sites[4], 3)
    np.save(tmp_path / "other.npy", np.array([n.replace("down", "input") for n in names]))
    with pytest.raises(ValueError, match="vectors of another model"):
        published_hrv(tmp_path / "vectors.npy", tmp_path / "other.npy", concepts,
                      {"animal": "Animals"}, sites, heads)
