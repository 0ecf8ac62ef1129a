"""Hugging Face ``generate`` options: the latent-aware loop honours them, or refuses them saying why.

Honoured: every option HF turns into a logits processor (sampling, penalties,
bad words, forced tokens, watermarking, ...) or a stopping criterion (EOS,
max length / time, stop strings, the caller's), ``output_scores`` /
``output_logits``, ``output_hidden_states`` / ``output_attentions`` (eager
steps), ``inputs_embeds``, ``streamer``, ``num_return_sequences``, static
caches and ``compile_config``. Refused (``NotImplementedError`` naming the
option): what needs another decoding loop (beam search, assisted decoding,
contrastive search, DoLa) or the model run on token ids the loop does not
have (classifier-free guidance), and hidden states or attentions from a
captured or compiled step.
README's "Patch a model" has the table; tests/models/test_generate_options.py walks
every GenerationConfig field, so a new one is classified before it is used.
"""
from __future__ import annotations

from transformers import StoppingCriteriaList
from transformers.generation import GenerationMode
from transformers.generation.stopping_criteria import StopStringCriteria

from . import hf_compat as hf

BEAMS = ("beam search ranks whole hypotheses by the sum of their tokens' log-probabilities, but a latent position "
         "has no token probability (its input is a vector the head computes from the hidden state), so hypotheses "
         "in and out of spans cannot be ranked against each other; use sampling with num_return_sequences")
ASSISTED = ("assisted decoding verifies the token ids a draft proposes in one forward pass, but inside a latent span "
            "each input is computed from the model's own previous hidden state, one position at a time: no draft "
            "can propose it and it cannot be verified in parallel")
GUIDANCE = ("classifier-free guidance runs the model a second time on the token ids, where a latent position is "
            "only its placeholder token, not the latent the model consumed")
MODES = {  # generation modes HF would run another loop for (GREEDY_SEARCH and SAMPLE are this loop)
    GenerationMode.BEAM_SEARCH: ("num_beams > 1", BEAMS),
    GenerationMode.BEAM_SAMPLE: ("num_beams > 1", BEAMS),
    GenerationMode.GROUP_BEAM_SEARCH: ("num_beam_groups / diversity_penalty (group beam search)", BEAMS),
    GenerationMode.CONSTRAINED_BEAM_SEARCH: ("constraints / force_words_ids (constrained beam search)", BEAMS),
    GenerationMode.ASSISTED_GENERATION: (
        "assistant_model / prompt_lookup_num_tokens / assistant_early_exit / use_mtp (assisted decoding)", ASSISTED),
    GenerationMode.CONTRASTIVE_SEARCH: (
        "penalty_alpha with top_k > 1 (contrastive search)",
        "contrastive search re-ranks top_k candidate tokens by running the model on each; a latent position has no "
        "candidate tokens (HF runs it from a Hub repository, which the latent-aware loop replaces)"),
    GenerationMode.DOLA_GENERATION: (
        "dola_layers (DoLa decoding)",
        "DoLa contrasts early layers' next-token logits with the last layer's to pick each token; the latent-aware "
        "loop samples from the last layer's alone"),
}
CACHES = (None, "dynamic", "static")  # cache_implementation values the loop decodes on


def refuse(option: str, why: str):
    raise NotImplementedError(f"generate: {option}: not supported by the latent-aware generate: {why}")


def setting(model, generation_config, kwargs, name):
    """An option's value as HF's generate settles it: the keyword, else the config passed (where it is not
    None), else the model's."""
    if name in kwargs:
        return kwargs[name]
    if generation_config is not None and getattr(generation_config, name) is not None:
        return getattr(generation_config, name)
    return getattr(model.generation_config, name)


def check_call(model, generation_config, assistant_model, synced_gpus, negative_prompt_ids,
               negative_prompt_attention_mask, custom_generate, kwargs) -> None:
    """The keywords ``gap_generate`` must refuse before HF acts on them (HF never hands them to the loop)."""
    if custom_generate is not None:
        raise ValueError("custom_generate: the latent-aware generate is itself a custom decoding loop")
    if assistant_model is not None:
        refuse("assistant_model", ASSISTED)
    if synced_gpus:
        refuse("synced_gpus", "ranks decoding one sharded model (DeepSpeed ZeRO-3, FSDP) would have to step "
                              "together, and each row's span state decides its own steps; generate with a full "
                              "model per rank")
    if negative_prompt_ids is not None or negative_prompt_attention_mask is not None:
        refuse("negative_prompt_ids / negative_prompt_attention_mask", GUIDANCE)
    if setting(model, generation_config, kwargs, "token_healing"):
        refuse("token_healing", "transformers does not hand the tokenizer it needs to a generate whose "
                                "custom_generate is a function; heal the prompt first: "
                                "model.heal_tokens(input_ids, tokenizer)")
    if setting(model, generation_config, kwargs, "is_assistant"):
        refuse("is_assistant", "HF sets it on the assistant model's config in assisted decoding; " + ASSISTED)
    cache = setting(model, generation_config, kwargs, "cache_implementation")
    if cache == "paged":  # HF switches to generate_batch before any loop runs
        refuse("cache_implementation='paged'", "continuous batching (generate_batch) runs its own loop on token "
                                               "ids, outside the latent-aware one")
    if cache not in CACHES:  # HF builds the cache before the loop runs: refuse before it does
        refuse(f"cache_implementation={cache!r}", "the loop decodes on a DynamicCache or a StaticCache "
                                                  "('static', static_cache=True)")
    if hf.exporting(model):
        refuse("torch.export (transformers.exporters)",
               "the exporters record the model's forward() calls during generate and export them as a prefill and "
               "a decode graph run by a token-by-token runner; the latent-aware loop feeds latents that the PCA head "
               "computes from the hidden state, which neither graph nor runner computes. Export the plain model: "
               "gapkern.unpatch(model) first")


def check_config(generation_config) -> None:
    """Refuse what HF's merged generation config asks for that the loop would otherwise ignore."""
    gc = generation_config
    mode = gc.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        refuse(*MODES.get(mode, (f"generation mode {mode}", "the latent-aware loop greedy-decodes or samples")))
    if gc.guidance_scale is not None and gc.guidance_scale != 1:  # HF's own condition for its CFG processor
        refuse("guidance_scale", GUIDANCE)
    if gc.use_cache is False:
        refuse("use_cache=False", "a latent exists only as the KV-cache entry of its position (the recomputing "
                                  "reference is gapkern.testing.naive_generate)")


def stop_strings(model, generation_config, stopping_criteria, kwargs):
    """``stop_strings`` as a stopping criterion built here: transformers (5.17 to 5.24) drops the ``tokenizer``
    keyword before it builds the criterion when ``custom_generate`` is a function. Updates ``kwargs``."""
    strings = setting(model, generation_config, kwargs, "stop_strings")
    if not strings:
        return stopping_criteria
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise ValueError("stop_strings: pass the model's tokenizer as tokenizer=... (generate needs it to match "
                         "stop strings)")
    kwargs["stop_strings"] = None  # HF would build the criterion again, without the tokenizer
    return StoppingCriteriaList([*(stopping_criteria or ()), StopStringCriteria(tokenizer, strings)])
