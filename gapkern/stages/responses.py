"""Responses to sample lines from one batched, patched ``generate``, each line's draws seeded by its ``id``.

Curation (N attempts per line) and evaluation (one response per line) both
call :func:`generate_responses`: the prompt is :func:`gapkern.data.prompts.prompt_batch`'s,
and attempt ``j`` of a line is drawn with ``derive_seed(seed, id, j)``
(:class:`gapkern.sampling.SeededSampler`), so it does not depend on the other lines of a
batch, on the number of ranks, or on where a run was resumed.

The ``ema`` calibration target is running state: each prefill moves it. A
run that resumes, or that splits its lines over ranks, would see another
target than an uninterrupted one; so a run computes one start target
(:func:`ema_start`) and every batch starts from it (``tau_ema=`` of
:func:`generate_responses`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import LogitsProcessorList

from ..data.prompts import prompt_batch, to_model
from ..sampling import ForceTokens, SeededSampler, derive_seed

__all__ = ["Response", "generate_responses", "response_texts", "ema_start"]


class Response(NamedTuple):
    """One response: its text (special tokens dropped, the latent span's markers kept: :func:`response_texts`)
    and how many latents it wrote."""

    text: str
    latents: int


def generate_responses(model, tokenizer, samples: list[dict], *, n: int = 1, temperature: float = 1.0,
                       max_new_tokens: int = 512, seed: int = 0, settings: dict | None = None,
                       suppress: list[int] | None = None, span_at: int | None = None,
                       tau_ema: torch.Tensor | None = None, trace=None,
                       protocol: dict | None = None) -> list[list[Response]]:
    """``n`` responses per sample (a list per sample) from one batched ``generate`` of a patched model.

    ``suppress``: token ids never sampled (the latent start of a model that was
    not trained to write latents). ``span_at``: every row is made to write the
    latent start token at new position ``span_at`` (so a model that never opens
    a span writes one; it wins over ``suppress``). ``tau_ema``: the running
    calibration target this batch starts from (default: the model's as it is). ``trace``: a
    :class:`gapkern.models.StepTrace` handed to ``generate`` (rows in sample
    order, ``n`` per sample). ``protocol`` (:mod:`gapkern.protocol`): its prompt, and its sampling settings in
    place of ``temperature`` and ``max_new_tokens``. Either way the checkpoint's own ``generation_config.json``
    is set aside (:func:`gapkern.protocol.own_generation_config`): these settings are the only ones.
    """
    from ..protocol import logits_processors, own_generation_config

    batch = to_model(prompt_batch(model, tokenizer, samples, settings=settings, protocol=protocol), model)
    prompt_len = batch["input_ids"].shape[1]
    seeds = [derive_seed(seed, sample["id"], j) for sample in samples for j in range(n)]
    if protocol is None:
        processors = [SeededSampler(seeds, prompt_len, temperature)]
    else:
        processors, max_new_tokens = logits_processors(protocol, seeds, prompt_len), protocol["max_new_tokens"]
    if span_at is not None:
        start = model.gap.config.latent_start_id
        processors.insert(0, ForceTokens(prompt_len, {(row, span_at): start for row in range(len(seeds))}))
    extra = {} if trace is None else {"trace": trace}
    if tau_ema is not None:
        model.gap.tau_ema.copy_(tau_ema)
    with own_generation_config(model):
        out = model.generate(**batch, do_sample=True, num_return_sequences=n, max_new_tokens=max_new_tokens,
                             logits_processor=LogitsProcessorList(processors), suppress_tokens=suppress or None,
                             return_dict_in_generate=True, **extra)
    texts = response_texts(tokenizer, out.sequences[:, prompt_len:], model.gap.config.profile)
    rows = [Response(text, int(latents.shape[0])) for text, latents in zip(texts, out.latents)]
    return [rows[i * n:(i + 1) * n] for i in range(len(samples))]


def response_texts(tokenizer, sequences: torch.Tensor, profile: str = "gap") -> list[str]:
    """Each row of new tokens as text: the tokenizer's special tokens (EOS, padding, ...) dropped, but the
    profile's five latent tokens kept, so a response reads ``<latent><latent_pad>...</latent><parser>a red
    square</parser>``, as the teacher text it was trained on does (skipping every special token would also
    drop these, since they are added as special tokens, and glue the parser text to its neighbours)."""
    from ..config import PROFILES

    keep = set(tokenizer.convert_tokens_to_ids(list(PROFILES[profile])))
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    drop = (special | set(tokenizer.all_special_ids)) - keep
    return [tokenizer.decode([t for t in row if t not in drop]) for row in sequences.tolist()]


def ema_start(model, samples: list[dict], *, batch: int = 8, settings: dict | None = None) -> torch.Tensor:
    """The running calibration target (1,) float32 a run starts every batch from: the patched model's own, or,
    when it has observed nothing yet (0 or NaN), the ema of the samples' visual input embeddings, fed
    ``batch`` lines at a time in file order as the prefills of an uninterrupted run would feed it."""
    from .. import ops
    from ..data import image_embeddings

    gap = model.gap
    tau = gap.tau_ema.detach().clone().float()
    if bool(tau.nan_to_num(0.0).any()):
        return tau
    tau.zero_()
    for i in range(0, len(samples), batch):
        images = [(path, None) for sample in samples[i:i + batch] for path in sample.get("images", [])]
        norms = [torch.linalg.vector_norm(embeds.float(), dim=-1)
                 for embeds, _ in image_embeddings(model, images, settings=settings)]
        if norms:
            ops.ema_update(tau, torch.cat(norms).to(tau.device), gap.config.ema_decay)
    return tau
