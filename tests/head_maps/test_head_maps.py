"""Per-head cross-attention word maps (icm.hooks.head_maps): exact, beside the model, no pixel
changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icm.head_maps.tokens import word_positions
from icm.hooks.head_maps import HeadMaps, StepWindow, capture_head_maps
from icm.hooks.sites import denoiser_of, list_sites

PROMPTS = ["a red circle", "a blue square and a blue sky"]
STEPS = 3


def run(pipe, n=2):
    generator = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS) * n)]
    return pipe(PROMPTS, num_images_per_prompt=n, num_inference_steps=STEPS, height=32,
                width=32, guidance_scale=7.5, generator=generator, output_type="np").images


def test_word_positions_cover_every_subword_token_of_every_occurrence(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    ids = tokenizer(PROMPTS[1], padding="max_length", max_length=77).input_ids
    blue = tokenizer("blue", add_special_tokens=False).input_ids
    positions = word_positions(tiny_pipe, PROMPTS[1], "blue")
    assert len(positions) == 2 * len(blue)  # both occurrences, each of its sub-word tokens
    assert [ids[p] for p in positions] == blue * 2
    with pytest.raises(ValueError, match=r"word 'green' .* is not in prompt 'a red circle'"):
        word_positions(tiny_pipe, PROMPTS[0], "green")


def test_maps_change_no_pixel_and_equal_diffusers_own_attention_scores(tiny_pipe):
    plain = run(tiny_pipe)
    attn2 = [s for s in list_sites(denoiser_of(tiny_pipe)) if s.endswith("attn2")]
    site = attn2[0]
    module = denoiser_of(tiny_pipe).get_submodule(site)
    reference = []  # diffusers' get_attention_scores on the conditional rows, every step

    def record(mod, args, kwargs, out):
        hidden, context = args[0], kwargs["encoder_hidden_states"]
        rows = slice(hidden.shape[0] // 2, None)
        q = mod.head_to_batch_dim(mod.to_q(hidden[rows]))
        k = mod.head_to_batch_dim(mod.to_k(context[rows]))
        probs = mod.get_attention_scores(q, k)  # (batch * heads, queries, keys)
        reference.append(probs.view(-1, mod.heads, *probs.shape[1:]).detach().clone())

    handle = module.register_forward_hook(record, with_kwargs=True)
    try:
        with pytest.raises(ValueError, match=r"word 'circle' .* is not in prompt 'a blue"):
            capture_head_maps(tiny_pipe, PROMPTS, ["circle"])  # one list: in every prompt
        words = [["circle", "red"], ["square", "blue"]]  # word slots: shape, colour
        with capture_head_maps(tiny_pipe, PROMPTS, words, images_per_prompt=2) as capture:
            images = run(tiny_pipe)
            maps = capture.pop()
    finally:
        handle.remove()
    np.testing.assert_array_equal(images, plain)  # bit-identical with maps on
    assert set(maps.maps) == set(attn2) and maps.steps == list(range(STEPS))
    got = maps.maps[site]  # (images, heads, words, y, x)
    heads = module.heads
    assert got.shape[:3] == (4, heads, 2) and got.shape[3] * got.shape[4] == \
        reference[0].shape[2]
    probs = torch.stack(reference).sum(dim=0)  # summed over steps: (images, heads, N, T)
    assert maps.words == [words[0], words[0], words[1], words[1]]
    for image in range(4):
        prompt = PROMPTS[image // 2]
        for w, word in enumerate(words[image // 2]):
            expected = probs[image][..., word_positions(tiny_pipe, prompt, word)].mean(-1)
            np.testing.assert_allclose(got[image, :, w].reshape(heads, -1), expected.numpy(),
                                       rtol=1e-4, atol=1e-6)


def test_the_step_window_sums_only_its_steps_and_per_step_maps_add_up(tiny_pipe):
    words = [["circle"], ["square"]]
    with capture_head_maps(tiny_pipe, PROMPTS, words, images_per_prompt=2,
                           keep_steps=True) as everything:
        run(tiny_pipe)
        full = everything.pop()
    with capture_head_maps(tiny_pipe, PROMPTS, words, images_per_prompt=2,
                           window=StepWindow(1, 3)) as late:
        run(tiny_pipe)
        window = late.pop()
    assert window.steps == [1, 2]
    for site, per_step in full.per_step.items():  # (images, steps, heads, words, y, x)
        assert per_step.shape[1] == STEPS
        np.testing.assert_allclose(per_step.sum(axis=1), full.maps[site], rtol=1e-5)
        np.testing.assert_allclose(per_step[:, 1:].sum(axis=1), window.maps[site], rtol=1e-5)
        # probabilities of one word at one query are at most 1 per step
        assert (window.maps[site] >= 0).all() and (window.maps[site] <= 2 + 1e-5).all()


def test_head_maps_share_the_hook_registry(tiny_pipe):
    from icm.hooks.registry import DoubleHookError

    with capture_head_maps(tiny_pipe, PROMPTS, [["circle"], ["square"]]):
        with pytest.raises(DoubleHookError):
            with capture_head_maps(tiny_pipe, PROMPTS, [["circle"], ["square"]]):
                pass
    attn1 = next(s for s in list_sites(denoiser_of(tiny_pipe)) if s.endswith("attn1"))
    with pytest.raises(ValueError, match="cross-attention"):
        capture_head_maps(tiny_pipe, PROMPTS, ["a"], sites=[attn1])


@pytest.fixture(scope="module")
def captured(tiny_pipe):
    words = [["circle", "red"], ["square", "blue"]]
    with capture_head_maps(tiny_pipe, PROMPTS, words, images_per_prompt=2) as capture:
        run(tiny_pipe)
        return capture.pop()


def test_all_heads_is_daams_formula_computed_directly(captured):
    """DAAM: each (site, head) map upsampled bicubically to 64 x 64, clamped at 0, averaged
    over heads and sites, here written out as plain loops."""
    import torch.nn.functional as F

    from icm.head_maps.aggregation import aggregate

    got = aggregate(captured.maps, "all")
    for image in range(4):
        for word in range(2):
            heads = []
            for maps in captured.maps.values():
                for head in range(maps.shape[1]):
                    one = torch.tensor(maps[image, head, word], dtype=torch.float32)
                    up = F.interpolate(one[None, None], size=(64, 64), mode="bicubic",
                                       align_corners=False)[0, 0]
                    heads.append(up.clamp(min=0))
            np.testing.assert_allclose(got[image, word], torch.stack(heads).mean(0),
                                       rtol=1e-5, atol=1e-7)


def test_topk_and_weighted_select_heads_by_relevance(captured):
    from icm.head_maps.aggregation import aggregate, chosen_heads, upsampled

    heads = [(s, h) for s, m in captured.maps.items() for h in range(m.shape[1])]
    rng = np.random.default_rng(0)
    relevance = {head: float(r) for head, r in zip(heads, rng.random(len(heads)))}
    best = max(heads, key=relevance.get)
    site, head = best
    one = upsampled({site: captured.maps[site]})[site][:, head]
    np.testing.assert_allclose(aggregate(captured.maps, "topk", relevance, k=1), one, rtol=1e-6)
    onehot = {h: float(h == best) for h in heads}
    np.testing.assert_allclose(aggregate(captured.maps, "weighted", onehot), one, rtol=1e-6)
    np.testing.assert_allclose(aggregate(captured.maps, "topk", relevance, k=len(heads)),
                               aggregate(captured.maps, "all"), rtol=1e-5, atol=1e-7)
    assert len(chosen_heads(heads, relevance, 0.25)) == int(np.ceil(0.25 * len(heads)))
    with pytest.raises(ValueError, match="heads, but there are"):
        chosen_heads(heads, relevance, len(heads) + 1)


def test_segment_normalises_and_thresholds():
    from icm.head_maps.aggregation import segment

    word_map = torch.zeros(8, 8)
    word_map[2:6, 2:6] = 1.0
    mask = segment(word_map, 16, 0.5)
    assert mask.shape == (16, 16) and mask[6:10, 6:10].all() and not mask[0].any()
    assert not segment(torch.ones(8, 8), 16, 0.5).any()  # flat: nothing


def test_head_map_store_opens_in_xarray_and_inspect_summarises_it(captured, tmp_path, capsys):
    import xarray as xr

    from icm.cli import main as cli_main
    from icm.generation.samples import plan_samples
    from icm.head_maps.store import HeadMapStoreWriter

    samples = plan_samples(PROMPTS, 2, base_seed=0)
    path = tmp_path / "head-maps.zarr"
    with HeadMapStoreWriter(path, samples, {"model": {"name": "tiny-sd15"}},
                            chunk_samples=2) as writer:
        writer.write(captured)
    ds = xr.open_zarr(path)
    site = next(iter(captured.maps))
    assert ds[site].dims[:3] == ("sample", "head", "word")
    np.testing.assert_allclose(ds[site].values, captured.maps[site], rtol=1e-3, atol=1e-4)
    assert ds.attrs["words"] == captured.words and ds.attrs["kind"] == "head-maps"
    assert cli_main(["inspect", str(path)]) == 0
    assert "(head maps)" in capsys.readouterr().out
    bad = HeadMaps(**{**captured.__dict__, "maps": {s: m * np.nan
                                                    for s, m in captured.maps.items()}})
    with pytest.raises(Exception, match="NaN, inf"):
        with HeadMapStoreWriter(tmp_path / "bad.zarr", samples, {}) as writer:
            writer.write(bad)
    assert not (tmp_path / "bad.zarr").exists() and not (tmp_path / "bad.zarr.partial").exists()


@pytest.mark.parametrize("instruction", [True, False])
def test_sana_maps_read_the_prompts_words_after_its_instruction_and_mask_the_padding(
        instruction):
    """SANA's attn2 attends to Gemma states of instruction + prompt, first token and last
    max_sequence_length - 1 kept, padding masked: the maps must use those positions and that
    mask, and leave the images as they are."""
    from icm.head_maps.tokens import encoded_tokens
    from icm.models.tiny_sana import build_tiny_sana

    pipe = build_tiny_sana(seed=0, text_width=12)  # projected, as real SANA
    arguments = {"use_resolution_binning": False, "max_sequence_length": 40}
    if not instruction:
        arguments["complex_human_instruction"] = None
    prompts, words = ["a red circle", "a blue square"], [["circle", "red"], ["square", "blue"]]

    def generate():
        generator = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
        return pipe(prompts, num_inference_steps=2, height=32, width=32, guidance_scale=4.5,
                    generator=generator, output_type="np", **arguments).images

    plain = generate()
    site = "transformer_blocks.0.attn2"
    module = denoiser_of(pipe).get_submodule(site)
    reference = []

    def record(mod, args, kwargs, out):  # diffusers' own masked attention scores
        hidden, context, mask = args[0], kwargs["encoder_hidden_states"], kwargs["attention_mask"]
        rows = slice(hidden.shape[0] // 2, None)
        q = mod.head_to_batch_dim(mod.to_q(hidden[rows]))
        k = mod.head_to_batch_dim(mod.to_k(context[rows]))
        bias = mod.prepare_attention_mask(mask[rows], k.shape[1], q.shape[0] // mod.heads)
        probs = mod.get_attention_scores(q, k, bias)
        reference.append(probs.view(-1, mod.heads, *probs.shape[1:]).detach().clone())

    handle = module.register_forward_hook(record, with_kwargs=True)
    try:
        with capture_head_maps(pipe, prompts, words, arguments=arguments) as capture:
            images = generate()
            maps = capture.pop()
    finally:
        handle.remove()
    np.testing.assert_array_equal(images, plain)
    probs = torch.stack(reference).sum(dim=0)
    got = maps.maps[site]
    for p, prompt in enumerate(prompts):
        ids, start = encoded_tokens(pipe, prompt, arguments)
        assert len(ids) == 40 and (start > 1) == instruction
        for w, word in enumerate(words[p]):
            positions = word_positions(pipe, prompt, word, arguments)
            assert min(positions) >= start  # in the prompt, never in the instruction
            assert pipe.tokenizer.decode([ids[i] for i in positions]).strip() == word
            expected = probs[p][..., positions].mean(-1)
            np.testing.assert_allclose(got[p, :, w].reshape(module.heads, -1), expected.numpy(),
                                       rtol=1e-4, atol=1e-6)


def test_sana_prompt_positions_start_where_the_instructions_space_merges_into_the_prompt():
    """A real Gemma tokenizer merges the instruction's trailing space into the prompt's first
    token ("User Prompt: " + "circle ..." -> "▁circle"): that token is the prompt's, found
    from the character offsets, so a slot word at the start of the prompt is found."""
    from transformers import GemmaTokenizerFast

    from icm.head_maps.tokens import encoded_tokens
    from icm.models.tiny_sana import build_gemma_tokenizer, build_tiny_sana

    pipe = build_tiny_sana(seed=0, text_width=12)  # projected, as real SANA
    vocab = dict(build_gemma_tokenizer().get_vocab())
    vocab["\u2581c"] = len(vocab) if "\u2581c" not in vocab else vocab["\u2581c"]
    pipe.tokenizer = GemmaTokenizerFast(vocab=vocab, merges=[("\u2581", "c")],
                                        pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    arguments = {"complex_human_instruction": ["a rule.", "user prompt: "],
                 "max_sequence_length": 30}
    ids, start = encoded_tokens(pipe, "circle on a red mat", arguments)
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[start] == "\u2581c"  # merged: half instruction, half prompt
    positions = word_positions(pipe, "circle on a red mat", "circle", arguments)
    assert positions[0] == start and len(positions) == len("circle")


@pytest.fixture(scope="module")
def tiny_flux():
    from icm.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(seed=0)


FLUX_PROMPTS = ["a photo of a doctor", "a portrait of a nurse"]
FLUX_CALL = {"height": 32, "width": 16, "num_inference_steps": 2, "guidance_scale": 3.5,
             "max_sequence_length": 12, "output_type": "np"}  # non-square: 16 x 8 tokens


def test_flux_maps_are_the_joint_softmax_on_text_keys_and_change_no_pixel(tiny_flux,
                                                                          monkeypatch):
    """FLUX's word maps: at every double-stream block's joint attention, each head's image
    queries' probabilities on the word's T5 positions, out of the softmax over the whole
    joint sequence. The reference is the attention the processor itself computes, made
    explicit: diffusers' attention call replaced by softmax(q k^T / sqrt(d)) on the
    processor's own (normed, rotated) queries and keys, recorded, and applied to its
    values."""
    import diffusers.models.transformers.transformer_flux as flux

    from icm.head_maps.tokens import encoded_tokens
    from icm.hooks.head_maps import word_map_sites

    arguments = {"max_sequence_length": 12}
    sites = word_map_sites(denoiser_of(tiny_flux))
    assert sites == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    ids, _ = encoded_tokens(tiny_flux, FLUX_PROMPTS[0], arguments)
    tokenizer = tiny_flux.tokenizer_2
    assert ids == tokenizer(FLUX_PROMPTS[0], padding="max_length", max_length=12).input_ids
    doctor = word_positions(tiny_flux, FLUX_PROMPTS[0], "doctor", arguments)
    assert [ids[p] for p in doctor] == tokenizer("doctor", add_special_tokens=False).input_ids

    def generator():
        return [torch.Generator("cpu").manual_seed(i) for i in range(2)]

    plain = tiny_flux(FLUX_PROMPTS, generator=generator(), **FLUX_CALL).images
    with capture_head_maps(tiny_flux, FLUX_PROMPTS, [["photo", "doctor"], ["portrait", "nurse"]],
                           arguments=arguments, keep_steps=True) as maps:
        captured = tiny_flux(FLUX_PROMPTS, generator=generator(), **FLUX_CALL).images
        out = maps.pop()
    assert np.array_equal(plain, captured)  # bit for bit

    recorded = []  # (B, heads, image queries, text keys) per call, blocks in forward order

    def explicit(query, key, value, attn_mask=None, **_):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))  # (B, H, S, D)
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)
        recorded.append(probs[:, :, 12:, :12])
        return (probs @ v).transpose(1, 2).to(query.dtype)

    monkeypatch.setattr(flux, "dispatch_attention_fn", explicit)
    tiny_flux(FLUX_PROMPTS, generator=generator(), **FLUX_CALL)
    single = len(tiny_flux.transformer.single_transformer_blocks)
    per_step = len(sites) + single  # the single-stream blocks call it too
    for s, site in enumerate(sites):
        for step in range(2):
            probs = recorded[step * per_step + s]
            nurse = word_positions(tiny_flux, FLUX_PROMPTS[1], "nurse", arguments)
            expected = torch.stack([probs[0, :, :, doctor].mean(-1),
                                    probs[1, :, :, nurse].mean(-1)])  # (B, H, image)
            got = torch.from_numpy(out.per_step[site][:, step, :, 1])  # the second word
            assert got.shape == (2, 2, 16, 8)  # 32 x 16 px: 16 x 8 packed tokens
            torch.testing.assert_close(got.flatten(2), expected, rtol=1e-5, atol=1e-6)
    assert out.words == [["photo", "doctor"], ["portrait", "nurse"]]


def test_flux_refuses_hrv_votes_in_one_sentence(tiny_flux):
    from icm.head_maps.relevance import ConceptVoting

    with pytest.raises(ValueError, match="HRV's concept-word voting needs cross-attention"):
        ConceptVoting(tiny_flux, {"who": ["doctor"], "what": ["photo"]})
