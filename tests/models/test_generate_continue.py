"""Continuing a conversation HF's way: generate, then generate again with the whole conversation as
``input_ids`` and ``past_key_values=out.past_key_values``. The images of the first turn are only in
the cache (their M-RoPE positions in HF's rope deltas), so a loop that re-read the prompt into an
empty cache would answer wrongly from the first new token."""
from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

import gapkern
from gapkern.models.qwen2_5_vl import hf_compat
from gapkern.testing import tiny_head, tiny_prompts, tiny_qwen2_5_vl
from gapkern.testing import naive_generate

from generate_cases import K, ROWS, forcing

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # HF's documented way; 5.24 renamed it ``cache`` and still accepts it, with this warning
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

GREEDY = dict(do_sample=False, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0)


def cache_of(out):
    return getattr(out, hf_compat.OUTPUT_CACHE)


def next_turn(batch, out, seed=7, extra=3):
    """Turn 2's inputs: turn 1's sequences, then ``extra`` new text tokens; the same rows, no new image."""
    rows, length = out.sequences.shape
    new = torch.randint(16, 128, (rows, extra), generator=torch.Generator().manual_seed(seed))
    input_ids = torch.cat([out.sequences, new], 1)
    grown = input_ids.shape[1] - batch["attention_mask"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(rows, grown, dtype=torch.long)], 1)
    return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": (input_ids == 5).long()}


def two_turns(model, batch, first=5, second=6, **kw):
    """Turn 1 on ``batch``, then turn 2 continued on its cache; returns both outputs."""
    one = model.generate(**batch, max_new_tokens=first, **GREEDY, **kw)
    cache = cache_of(one)
    assert cache.get_seq_length() == one.sequences.shape[1] - 1  # HF's convention: all but the last token
    two = model.generate(**next_turn(batch, one), past_key_values=cache, max_new_tokens=second, **GREEDY, **kw)
    return one, two


def test_continuation_matches_hugging_face_without_spans(tiny):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    kw = dict(suppress_tokens=[ids.latent_start])
    ref = two_turns(model, batch, **kw)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K, calibration="rms"))
    try:
        got = two_turns(model, batch, **kw)
    finally:
        gapkern.unpatch(model)
    for a, b in zip(got, ref):
        assert torch.equal(a.sequences, b.sequences), f"\n{a.sequences}\n{b.sequences}"
    one, two = got
    assert cache_of(two) is cache_of(one)  # continued in place, as HF does
    assert cache_of(two).get_seq_length() == two.sequences.shape[1] - 1


@pytest.mark.parametrize("calibration", ["none", "rms", "ema"])
def test_continuation_with_spans_matches_the_naive_loop_on_the_whole_conversation(tiny, calibration):
    """Turn 1 writes spans after an image; turn 2 writes more. The naive loop re-reads the whole
    conversation (image, turn 1's latents at their placeholders) with no cache at all."""
    model, ids = tiny
    s = ids.latent_start
    batch = tiny_prompts(ids, ROWS, seed=1)
    cfg = ids.gap_config(latent_budget=K, calibration=calibration)
    gapkern.patch(model, tiny_head(model), cfg)
    try:
        model.gap.tau_ema.zero_()
        one = model.generate(**batch, max_new_tokens=6, logits_processor=forcing(batch, ids, {(1, 0): s, (0, 1): s}),
                             **GREEDY)
        ema = float(model.gap.tau_ema)
        turn = next_turn(batch, one)
        procs = forcing(turn, ids, {(2, 0): s, (0, 2): s, (1, 3): ids.eos})
        two = model.generate(**turn, past_key_values=cache_of(one), max_new_tokens=7, logits_processor=procs,
                             **GREEDY)
        assert float(model.gap.tau_ema) == ema  # a continuation adds no image: nothing new observed
        whole = {**turn, "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
        tau = reference_tau(model, batch, ids, calibration, ema)
        seq, latents, _ = naive_generate(model, whole, cfg, model.gap.head, tau, 7, procs, prompt_latents=one.latents)
    finally:
        gapkern.unpatch(model)
    assert [len(z) for z in one.latents] == [K, K, 0] and [len(z) for z in two.latents] == [K, 0, K]
    assert torch.equal(two.sequences, seq), f"\n{two.sequences}\n{seq}"
    for got, want in zip(two.latents, latents):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def reference_tau(model, batch, ids, mode, ema):
    """Turn 1's targets (SPEC section 2), computed apart from gapkern: each row's own image norms, else ema."""
    if mode == "none":
        return None
    with torch.no_grad():
        feats = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
    norms, counts, tau = feats.double().norm(dim=-1).tolist(), (batch["input_ids"] == ids.image_pad).sum(1), []
    for n in counts.tolist():
        tau.append(sum(norms[:n]) / n if n and mode == "rms" else ema)
        norms = norms[n:]
    return tau


def test_continuation_refuses_what_the_cache_cannot_carry(tiny):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    kw = dict(suppress_tokens=[ids.latent_start], max_new_tokens=3)
    plain = model.generate(**batch, **GREEDY, **kw)  # a cache written without gapkern: no image norms with it
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K, calibration="rms"))
    try:
        one = model.generate(**batch, **GREEDY, **kw)
        turn = next_turn(batch, one)

        def again(**over):
            return model.generate(**{**turn, "past_key_values": cache_of(one), **kw, **over})

        with pytest.raises(ValueError, match="pixel_values"):
            again(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        with pytest.raises(ValueError, match="past_key_values.*static_cache"):
            again(static_cache=True)
        with pytest.raises(ValueError, match="input_ids: past_key_values holds"):
            again(input_ids=turn["input_ids"][:, -3:], attention_mask=turn["attention_mask"][:, -3:],
                  mm_token_type_ids=turn["mm_token_type_ids"][:, -3:])
        image = turn["input_ids"].clone()
        image[:, -1] = ids.image_pad
        with pytest.raises(ValueError, match="input_ids: image or video tokens"):
            again(input_ids=image)
        placeholder = turn["input_ids"].clone()
        placeholder[:, -4] = ids.latent_pad  # turn 1 cut off mid-span: its last latent is not in the ids
        with pytest.raises(ValueError, match="latent_pad_id"):
            again(input_ids=placeholder)
        with pytest.raises(ValueError, match="calibration 'rms'"):
            model.generate(**next_turn(batch, plain), past_key_values=cache_of(plain), **kw)
        static = StaticCache(config=model.config, max_cache_len=64)  # holding the same positions
        for i, layer in enumerate(cache_of(one).layers):
            static.update(layer.keys, layer.values, i)
        with pytest.raises(ValueError, match="DynamicCache"):
            again(past_key_values=static)
    finally:
        gapkern.unpatch(model)


@pytest.mark.parametrize("how", [dict(cache_implementation="static"), dict(static_cache=True)],
                         ids=["cache_implementation", "static_cache"])
def test_a_static_generate_returns_its_static_cache_as_hugging_face_does(tiny, how):
    """HF's generate returns the StaticCache it decoded on (issue 17 item 15; HF reuses it on its next call,
    as the kept static decoder does): it holds the whole conversation but its last token, the same keys and
    values a dynamic run's cache holds, latent positions included."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    kw = dict(max_new_tokens=6, logits_processor=forcing(batch, ids, {(1, 0): ids.latent_start}), **GREEDY)
    hf_static = model.generate(**batch, **{**kw, "logits_processor": None}, cache_implementation="static")
    assert isinstance(cache_of(hf_static), StaticCache)  # what HF does
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K, calibration="rms"))
    try:
        dynamic = model.generate(**batch, **kw)
        static = model.generate(**batch, **kw, **how)
    finally:
        gapkern.unpatch(model)
    assert torch.equal(static.sequences, dynamic.sequences) and len(static.latents[1]) == K
    cache, held = cache_of(static), dynamic.sequences.shape[1] - 1
    assert isinstance(cache, StaticCache) and cache.get_seq_length() == held
    for got, want in zip(cache.layers, cache_of(dynamic).layers):
        torch.testing.assert_close(got.keys[:, :, :held], want.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.values[:, :, :held], want.values, rtol=1e-5, atol=1e-5)
