"""Prompts and side channels of the latent-aware generate beyond input_ids: inputs_embeds (with or without
ids, as HF allows), chunked prefill, compile_config, streamers, and HF's exporters (refused)."""
from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, LogitsProcessorList, TextStreamer

import gapkern
from gapkern.models.qwen2_5_vl import hf_compat
from gapkern.testing import ForceTokens, tiny_head, tiny_prompts, tiny_qwen2_5_vl, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

K = 2
KEEP = dict(return_dict_in_generate=True, output_scores=True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0)


def embedded(model, batch, ids_too):
    """``batch`` with its prompt as inputs_embeds (image placeholders keep the image token's embedding, as a
    caller's embeddings would), with or without its input_ids."""
    out = {k: v for k, v in batch.items() if k != "input_ids" or ids_too}
    with torch.no_grad():
        out["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"])
    return out


def close_outputs(out, ref):
    assert torch.equal(out.sequences, ref.sequences), f"\n{out.sequences}\n{ref.sequences}"
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static", [pytest.param(False, id="dynamic"), pytest.param(True, id="static")])
@pytest.mark.parametrize("ids_too", [pytest.param(False, id="embeds-only"), pytest.param(True, id="with-ids")])
@pytest.mark.parametrize("rows", [pytest.param([(4, None), (2, None)], id="text"),
                                  pytest.param([(4, None), (2, (56, 56))], id="image")])
def test_inputs_embeds_match_hugging_face(tiny, rows, ids_too, static):
    """HF returns only the new tokens for an embeds-only prompt, the whole sequence with ids; so must the
    patched generate (and HF positions an embeds-only image prompt as text: the loop takes HF's positions)."""
    model, ids = tiny
    batch = embedded(model, tiny_prompts(ids, rows, seed=1), ids_too)
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[ids.latent_start], **KEEP)
    ref = model.generate(**batch, **kw)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K, calibration="rms"))
    try:
        out = model.generate(**batch, static_cache=static, **kw)
    finally:
        gapkern.unpatch(model)
    assert out.sequences.shape[1] == 5 + (batch["input_ids"].shape[1] if ids_too else 0)
    close_outputs(out, ref)


def test_inputs_embeds_prompt_writes_the_spans_of_its_ids_prompt(tiny):
    """An embeds-only prompt (rows 0 and 2 end with the start token's embedding) writes the same spans,
    latents and tokens as the same prompt given as ids; its processors see only the new tokens."""
    model, ids = tiny
    s = ids.latent_start
    batch = tiny_prompts(ids, [(3, None, True), (5, None), (2, None, True)], seed=3)
    length, steps = batch["input_ids"].shape[1], 9
    sched = {(1, 0): s, (0, 4): s}
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K))
    try:
        kw = dict(max_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
        by_ids = model.generate(**batch, logits_processor=LogitsProcessorList([ForceTokens(length, sched, [s])]), **kw)
        by_embeds = model.generate(**embedded(model, batch, False),
                                   logits_processor=LogitsProcessorList([ForceTokens(0, sched, [s])]), **kw)
    finally:
        gapkern.unpatch(model)
    assert torch.equal(by_embeds.sequences, by_ids.sequences[:, length:])
    assert [len(z) for z in by_embeds.latents] == [2 * K, K, K]
    for a, b in zip(by_embeds.latents, by_ids.latents):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_refusals_name_the_argument(tiny):
    model, ids = tiny
    batch = tiny_prompts(ids, [(4, None), (2, None)], seed=1)
    gapkern.patch(model, None, ids.gap_config())
    try:
        first = model.generate(**batch, max_new_tokens=2, return_dict_in_generate=True)
        cache = {hf_compat.OUTPUT_CACHE: getattr(first, hf_compat.OUTPUT_CACHE)}  # generate's keyword too
        whole = torch.cat([first.sequences, torch.full((2, 1), 20)], 1)
        with pytest.raises(ValueError, match="inputs_embeds: continuing a conversation"):
            model.generate(input_ids=whole, inputs_embeds=model.get_input_embeddings()(whole),
                           attention_mask=torch.ones_like(whole), max_new_tokens=2, **cache)
        with pytest.raises(ValueError, match="input_ids: with inputs_embeds"):
            model.generate(input_ids=batch["input_ids"][:, 1:], attention_mask=batch["attention_mask"],
                           inputs_embeds=embedded(model, batch, False)["inputs_embeds"], max_new_tokens=2)
    finally:
        gapkern.unpatch(model)


def test_prefill_chunk_size_prefills_in_chunks_with_the_same_result(tiny):
    model, ids = tiny
    batch = tiny_prompts(ids, [(4, None), (2, (56, 56))], seed=1)
    length, chunk = batch["input_ids"].shape[1], 3
    procs = LogitsProcessorList([ForceTokens(length, {(0, 1): ids.latent_start}, [ids.latent_start])])
    widths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K, calibration="rms"))
    try:
        kw = dict(max_new_tokens=6, do_sample=False, logits_processor=procs, **KEEP)
        whole = model.generate(**batch, **kw)
        widths.clear()
        chunked = model.generate(**batch, prefill_chunk_size=chunk, **kw)
    finally:
        gapkern.unpatch(model)
        hook.remove()
    assert widths[:-(6 - 1)] == [chunk] * (length // chunk) + [length % chunk] * (length % chunk > 0)
    close_outputs(chunked, whole)
    for a, b in zip(chunked.latents, whole.latents):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_config_follows_hugging_face_criteria(tiny):
    """HF compiles the decode step only on a static cache, on devices it compiles for (the CPU only with
    _compile_all_devices); so does the patched generate, and cuda_graph with compile_config is ambiguous."""
    model, ids = tiny
    batch = tiny_prompts(ids, [(4, None)], seed=1)
    kw = dict(max_new_tokens=3, do_sample=False, suppress_tokens=[ids.latent_start], cache_implementation="static")
    gapkern.patch(model, None, ids.gap_config())
    try:
        model.generate(**batch, compile_config=CompileConfig(backend="eager", mode=None), **kw)
        assert model.gap.decoder.compiled_with is None  # on the CPU HF would not compile either (and says so)
        with pytest.raises(ValueError, match="cuda_graph / compile_config"):
            model.generate(**batch, compile_config=CompileConfig(backend="eager", mode=None), cuda_graph=True, **kw)
    finally:
        gapkern.unpatch(model)


def test_text_streamer_prints_a_latent_generation(tiny, capsys):
    """HF's TextStreamer on a patched model: the prompt is skipped, every new position is streamed, latent
    placeholders and the forced end token included, and the printed text is the decoded new tokens."""
    model, ids = tiny
    tokenizer = tiny_tokenizer(ids)
    batch = tiny_prompts(ids, [(4, None)], seed=1)
    length = batch["input_ids"].shape[1]
    procs = LogitsProcessorList([ForceTokens(length, {(0, 1): ids.latent_start}, [ids.latent_start, ids.eos])])
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K))
    try:
        out = model.generate(**batch, max_new_tokens=7, do_sample=False, logits_processor=procs,
                             streamer=TextStreamer(tokenizer, skip_prompt=True))
    finally:
        gapkern.unpatch(model)
    new = out[0, length:]
    assert new[2:2 + K].tolist() == [ids.latent_pad] * K and new[2 + K] == ids.latent_end
    assert capsys.readouterr().out.strip() == tokenizer.decode(new).strip()
