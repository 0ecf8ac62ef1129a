"""Every Hugging Face generate option on a patched model: honoured (no span opened, the patched model equals
the unpatched one token for token and score for score) or refused with an error naming it.

FIELDS classifies every GenerationConfig field and KEYWORDS every keyword of GenerationMixin.generate; a
field or keyword transformers adds fails test_every_*_is_classified until someone classifies it here (and in
README's table). Options HF itself ignores without beams or an assistant are honoured the same way: they must
change nothing, as they change nothing in HF.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from transformers import CompileConfig, GenerationConfig, GenerationMixin, StoppingCriteria, WatermarkingConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.streamers import BaseStreamer

import gapkern
from gapkern.testing import ForceTokens, tiny_qwen2_5_vl, tiny_prompts, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [(4, None), (3, None)]  # seed 1, start token suppressed: row 0 writes 13 16 80 35 27 36 greedily
EOS = 16  # row 0's second token: an EOS that ends it early, so min lengths and padding matter
STOP = "w80"  # row 0's third token, as the tiny tokenizer writes it


@dataclass
class Case:
    kw: dict
    refused: str | None = None  # the regex the NotImplementedError must match; None: honoured
    check: Callable | None = None  # called with the patched model after its generate
    reference: dict = field(default_factory=dict)  # what the unpatched run takes instead


def same(**kw):
    return Case(kw)


def refused(match, **kw):
    return Case(kw, match)


def compiled_decoder(model):
    assert model.gap.decoder.compiled_with is not None, "compile_config did not compile the decode step"


def sized_cache(model):
    assert model.gap.decoder.max_len >= 300


def eager_compile():
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True  # HF's switch to compile on the CPU
    return config


SAMPLE = dict(do_sample=True)
FIELDS = {  # GenerationConfig field -> cases
    # sampling and logits processors: HF builds them, the loop calls them on text steps
    "do_sample": [same(do_sample=True)],
    "temperature": [same(**SAMPLE, temperature=0.7)],
    "top_k": [same(**SAMPLE, top_k=5)],
    "top_p": [same(**SAMPLE, top_p=0.8)],
    "min_p": [same(**SAMPLE, min_p=0.1)],
    "typical_p": [same(**SAMPLE, typical_p=0.9)],
    "epsilon_cutoff": [same(**SAMPLE, epsilon_cutoff=3e-3)],
    "eta_cutoff": [same(**SAMPLE, eta_cutoff=1e-3)],
    "top_h": [same(**SAMPLE, top_h=0.5)],
    "repetition_penalty": [same(repetition_penalty=1.5)],
    "encoder_repetition_penalty": [same(encoder_repetition_penalty=1.5)],
    "no_repeat_ngram_size": [same(no_repeat_ngram_size=2)],
    "encoder_no_repeat_ngram_size": [same(encoder_no_repeat_ngram_size=2)],
    "bad_words_ids": [same(bad_words_ids=[[13], [16, 80]])],
    "sequence_bias": [same(sequence_bias=[[[20], 5.0]])],
    "suppress_tokens": [same(suppress_tokens=[2, 13])],
    "begin_suppress_tokens": [same(begin_suppress_tokens=[13])],
    "forced_bos_token_id": [same(forced_bos_token_id=20)],
    "forced_eos_token_id": [same(forced_eos_token_id=20)],
    "min_length": [same(eos_token_id=EOS, min_length=9)],
    "min_new_tokens": [same(eos_token_id=EOS, min_new_tokens=4)],
    "exponential_decay_length_penalty": [same(eos_token_id=EOS, exponential_decay_length_penalty=(2, 1.5))],
    "remove_invalid_values": [same(remove_invalid_values=True)],
    "renormalize_logits": [same(renormalize_logits=True)],
    "watermarking_config": [same(watermarking_config=WatermarkingConfig())],
    # lengths, stopping, special tokens
    "max_new_tokens": [same(max_new_tokens=3)],
    "max_length": [same(max_new_tokens=None, max_length=9)],
    "max_time": [same(max_time=0.0)],
    "stop_strings": [same(stop_strings=[STOP])],  # with the tokenizer: see options()
    "eos_token_id": [same(eos_token_id=EOS)],
    "pad_token_id": [same(eos_token_id=EOS, pad_token_id=7)],
    "bos_token_id": [same(bos_token_id=20)],  # used only without a prompt
    "decoder_start_token_id": [same(decoder_start_token_id=20)],  # encoder-decoder models only
    # outputs
    "num_return_sequences": [same(**SAMPLE, num_return_sequences=2)],
    "return_dict_in_generate": [same(return_dict_in_generate=False)],
    "output_scores": [same(output_scores=False)],
    "output_logits": [same(output_logits=False)],
    # sdpa returns HF's empty per-layer attention tuples; test_generate_scores compares eager attention
    "output_attentions": [same(output_attentions=True),
                          refused("output_hidden_states / output_attentions with cuda_graph or compile_config",
                                  output_attentions=True, compile_config=eager_compile())],
    "output_hidden_states": [same(output_hidden_states=True),
                             refused("output_hidden_states / output_attentions with cuda_graph or compile_config",
                                     output_hidden_states=True, cuda_graph=True)],
    # caches and compilation
    "use_cache": [refused("use_cache=False", use_cache=False)],
    "cache_implementation": [same(cache_implementation="static"), same(cache_implementation="dynamic"),
                             refused("cache_implementation='offloaded'", cache_implementation="offloaded"),
                             refused("cache_implementation='sliding_window'", cache_implementation="sliding_window"),
                             refused("cache_implementation='quantized'", cache_implementation="quantized"),
                             refused("cache_implementation='paged'", cache_implementation="paged")],
    "cache_config": [same(cache_config={"nbits": 4})],  # HF reads it for cache_implementation='quantized' only
    "max_cache_len": [Case(dict(cache_implementation="static", max_cache_len=300), check=sized_cache)],
    # 5.17's own chunked prefill fails on Qwen2.5-VL; chunks change no result (test_generate_inputs counts them)
    "prefill_chunk_size": [Case(dict(prefill_chunk_size=2), reference=dict(prefill_chunk_size=None))],
    "compile_config": [Case(dict(cache_implementation="static", compile_config=eager_compile()),
                            check=compiled_decoder)],
    "disable_compile": [same(disable_compile=True)],
    "continuous_batching_config": [same(continuous_batching_config=ContinuousBatchingConfig())],  # paged only
    # other decoding loops: refused
    "num_beams": [refused("num_beams", num_beams=2)],
    "num_beam_groups": [refused("num_beam_groups", num_beams=2, num_beam_groups=2, diversity_penalty=0.5)],
    "diversity_penalty": [same(diversity_penalty=0.5)],  # group beam search only
    "length_penalty": [same(length_penalty=2.0)],  # beam search only
    "early_stopping": [same(early_stopping=True)],  # beam search only
    "constraints": [refused("constraints", constraints=[[20, 21]])],
    "force_words_ids": [refused("force_words_ids", force_words_ids=[[20]])],
    "penalty_alpha": [refused("penalty_alpha", penalty_alpha=0.6, top_k=4)],
    "low_memory": [same(low_memory=True)],  # contrastive search and beam search only
    "dola_layers": [refused("dola_layers", dola_layers="low")],
    "guidance_scale": [refused("guidance_scale", guidance_scale=1.5)],
    "token_healing": [refused("token_healing", token_healing=True)],
    # assisted decoding: refused; its parameters change nothing without an assistant, in HF too
    "prompt_lookup_num_tokens": [refused("prompt_lookup_num_tokens", prompt_lookup_num_tokens=3)],
    "assistant_early_exit": [refused("assistant_early_exit", assistant_early_exit=1)],
    "use_mtp": [refused("use_mtp", use_mtp=True)],
    "is_assistant": [refused("is_assistant", is_assistant=True)],
    "num_assistant_tokens": [same(num_assistant_tokens=3)],
    "num_assistant_tokens_schedule": [same(num_assistant_tokens_schedule="constant")],
    "assistant_confidence_threshold": [same(assistant_confidence_threshold=0.3)],
    "assistant_lookbehind": [same(assistant_lookbehind=5)],
    "target_lookbehind": [same(target_lookbehind=5)],
    "max_matching_ngram_size": [same(max_matching_ngram_size=3)],
    "assistant_ensemble_weight": [same(assistant_ensemble_weight=0.5)],
    "speculation_type": [same(speculation_type="dflash")],
    "transformers_version": [same(transformers_version="5.0.0")],  # metadata
}


class StopOn(StoppingCriteria):
    """Ends a row once it wrote ``token``."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


KEYWORDS = {  # GenerationMixin.generate's own parameters -> cases (the model inputs are tested apart)
    "inputs": [same()],  # the prompt passed positionally: see options()
    "generation_config": [same(generation_config=GenerationConfig(max_new_tokens=4, do_sample=False,
                                                                  suppress_tokens=[2], output_scores=True,
                                                                  return_dict_in_generate=True))],
    "logits_processor": [same(logits_processor=[ForceTokens(5, {(0, 1): 40, (1, 3): 41})])],
    "stopping_criteria": [same(stopping_criteria=[StopOn(80)])],
    "prefix_allowed_tokens_fn": [same(prefix_allowed_tokens_fn=lambda b, ids: list(range(16, 60)))],
    "streamer": [same()],  # a Recorder: see options()
    "synced_gpus": [refused("synced_gpus", synced_gpus=True)],
    "assistant_model": [refused("assistant_model")],  # the model itself: see options()
    "negative_prompt_ids": [refused("negative_prompt_ids", negative_prompt_ids=torch.tensor([[20, 21]]))],
    "negative_prompt_attention_mask": [refused("negative_prompt_attention_mask",
                                               negative_prompt_attention_mask=torch.ones(1, 2, dtype=torch.long))],
    "custom_generate": [Case(dict(custom_generate=lambda *a, **k: None), "custom_generate")],
}


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0)


def tokenizer(ids):
    """The tiny tokenizer, made usable by StopStringCriteria (it probes the vocabulary behind 'abcdef')."""
    tok = tiny_tokenizer(ids)
    tok.add_tokens(["abcdef"])
    return tok


def options(name, case, model, ids):
    """generate's keywords for one case: the batch, a base that keeps scores, the case's options."""
    batch = tiny_prompts(ids, ROWS, seed=1)
    kw = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[ids.latent_start], return_dict_in_generate=True,
              output_scores=True, output_logits=True)
    if name == "generation_config":
        kw = {}
    kw.update(batch)
    kw.update(case.kw)
    if kw.get("max_new_tokens", 0) is None:
        del kw["max_new_tokens"]
    if name == "stop_strings":
        kw["tokenizer"] = tokenizer(ids)
    if name == "assistant_model":
        kw["assistant_model"] = model
    if name == "inputs":
        return (kw.pop("input_ids"),), kw
    return (), kw


def generate(model, args, kw, seed=0):
    torch.manual_seed(seed)
    return model.generate(*args, **kw)


def assert_same_output(out, ref):
    if torch.is_tensor(ref):
        assert torch.equal(out, ref), f"\n{out}\n{ref}"
        return
    assert torch.equal(out.sequences, ref.sequences), f"\n{out.sequences}\n{ref.sequences}"
    for name in ("scores", "logits", "hidden_states", "attentions"):
        want, got = getattr(ref, name), getattr(out, name)
        assert (got is None) == (want is None), name
        if want is not None:
            assert len(got) == len(want)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def cases(table):
    return [pytest.param(name, case, id=f"{name}-{i}" if len(table[name]) > 1 else name)
            for name in table for i, case in enumerate(table[name])]


def run_case(model, ids, name, case):
    args, kw = options(name, case, model, ids)
    cfg = ids.gap_config(latent_budget=2)
    if case.refused is not None:
        gapkern.patch(model, None, cfg)
        try:
            with pytest.raises((NotImplementedError, ValueError), match=case.refused):
                generate(model, args, kw)
        finally:
            gapkern.unpatch(model)
        return
    streamers = (Recorder(), Recorder()) if name == "streamer" else (None, None)
    ref = generate(model, args, {**kw, **case.reference, "streamer": streamers[0]})
    gapkern.patch(model, None, cfg)
    try:
        out = generate(model, args, {**kw, "streamer": streamers[1]})
        if case.check is not None:
            case.check(model)
    finally:
        gapkern.unpatch(model)
    assert_same_output(out, ref)
    if name == "streamer":
        assert streamers[1].puts == streamers[0].puts and streamers[1].ended == streamers[0].ended == 1


@pytest.mark.parametrize("name,case", cases(FIELDS))
def test_generation_config_field(tiny, name, case):
    run_case(*tiny, name, case)


@pytest.mark.parametrize("name,case", cases(KEYWORDS))
def test_generate_keyword(tiny, name, case):
    run_case(*tiny, name, case)


def test_every_generation_config_field_is_classified():
    fields = {k for k in GenerationConfig().__dict__ if not k.startswith("_")}
    assert fields - set(FIELDS) == set(), (
        "transformers added GenerationConfig fields: classify them (honoured with a test, or refused in "
        "gapkern.models.generate_options) here and in README's table")
    assert set(FIELDS) - fields == set(), "FIELDS lists fields GenerationConfig no longer has"


def test_every_generate_keyword_is_classified():
    params = set(inspect.signature(GenerationMixin.generate).parameters) - {"self", "kwargs"}
    assert params == set(KEYWORDS), f"GenerationMixin.generate's keywords changed: {sorted(params ^ set(KEYWORDS))}"


def test_options_that_change_nothing_in_hf_are_inert_there_too(tiny):
    """The honoured-because-inert entries are a claim about HF: check it, so that one HF starts to use is seen."""
    model, ids = tiny
    plain_args, plain_kw = options("plain", same(), model, ids)
    plain = generate(model, plain_args, plain_kw)
    for name in ("diversity_penalty", "length_penalty", "early_stopping", "low_memory", "num_assistant_tokens",
                 "assistant_confidence_threshold", "max_matching_ngram_size", "cache_config",
                 "continuous_batching_config", "decoder_start_token_id", "bos_token_id", "speculation_type"):
        args, kw = options(name, FIELDS[name][0], model, ids)
        assert_same_output(generate(model, args, kw), plain)


def test_stop_strings_from_the_model_generation_config(tiny):
    """Stop strings in the model's own generation config (not a keyword) reach the loop as well."""
    model, ids = tiny
    args, kw = options("stop_strings", same(), model, ids)
    kw["tokenizer"] = tokenizer(ids)
    model.generation_config.stop_strings = [STOP]
    try:
        ref = generate(model, args, kw)
        gapkern.patch(model, None, ids.gap_config())
        try:
            out = generate(model, args, kw)
        finally:
            gapkern.unpatch(model)
    finally:
        model.generation_config.stop_strings = None
    assert_same_output(out, ref)
    assert (out.sequences[0, -3:] == ids.pad).all()  # row 0 stopped at its stop string
