"""Responses to sample lines from one batched, patched ``generate``, each line's draws seeded by its ``id``.

Curation (N attempts per line) and evaluation (one response per line) both
call :func:`generate_responses`: the prompt is :func:`gapkern.data.prompts.prompt_batch`'s,
and attempt ``j`` of a line is drawn with ``derive_seed(seed, id, j)``
(:class:`SeededSampler`), so it does not depend on the other lines of a
batch, on the number of ranks, or on where a run was resumed.

The ``ema`` calibration target is running state: each prefill moves it. A
run that resumes, or that splits its lines over ranks, would see another
target than an uninterrupted one; so a run computes one start target
(:func:`ema_start`) and every batch starts from it (``tau_ema=`` of
:func:`generate_responses`).
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .data.prompts import prompt_batch, to_model

__all__ = ["derive_seed", "SeededSampler", "ForceTokens", "Response", "generate_responses", "ema_start"]


def derive_seed(*parts) -> int:
    """A non-negative 63-bit seed from ``parts`` (the run seed and a line's id, then the attempt, ...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ForceTokens(LogitsProcessor):
    """A logits processor that scripts tokens: a latent span at a given position (``--span-at``), or spans on
    random weights in the tests.

    ``schedule`` maps ``(row, i)`` to the token that row must emit at its
    ``i``-th new position (counting latent positions, as ``max_new_tokens``
    does); every other choice of a ``banned`` token (the latent start, by
    default none) is masked out, so random weights never open a span unasked.
    Pure: the same call gives the same scores, so a cached loop and a naive
    recomputing loop see identical choices.
    """

    def __init__(self, prompt_len: int, schedule: dict, banned=()):
        self.prompt_len, self.schedule, self.banned = prompt_len, dict(schedule), list(banned)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        i = input_ids.shape[1] - self.prompt_len
        scores = scores.clone()
        if self.banned:
            scores[:, self.banned] = float("-inf")
        for (row, at), token in self.schedule.items():
            if at == i:
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


class SeededSampler(LogitsProcessor):
    """Draws row ``b``'s token from ``softmax(scores / temperature)`` with noise seeded by ``(seeds[b], step)``.

    Gumbel-max: ``argmax(scores / T + G)``, ``G = -log(-log(U))``, is a sample
    of that softmax. ``U`` is a function of the row's seed and its new position
    only: not of the other rows (``do_sample``'s multinomial draws the whole
    batch from one stream), nor of how many steps sampled before (the patched
    generate samples no token while every row writes latents). The returned
    scores are 0 at the drawn token and -inf elsewhere, so ``do_sample`` and
    any warper after this one can only pick it. ``temperature=0``: greedy.
    """

    def __init__(self, seeds: list[int], prompt_len: int, temperature: float = 1.0):
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        self.seeds, self.prompt_len, self.temperature = list(seeds), prompt_len, float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"scores: expected {len(self.seeds)} rows (one per seed), got {scores.shape[0]}")
        logits = scores.float()
        if self.temperature > 0:
            step = input_ids.shape[1] - self.prompt_len
            noise = torch.stack([self.uniform(derive_seed(s, step), scores.shape[1], scores.device)
                                 for s in self.seeds])
            logits = logits / self.temperature - torch.log(-torch.log(noise))
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter_(1, logits.argmax(-1, keepdim=True), 0.0)

    @staticmethod
    def uniform(seed: int, n: int, device) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        u = torch.rand(n, generator=generator, device=device)
        return u.clamp_min(torch.finfo(u.dtype).tiny)  # u = 0 would give the token -inf noise


class Response(NamedTuple):
    """One response: its text (special tokens dropped, the latent span's markers kept: :func:`response_texts`)
    and how many latents it wrote."""

    text: str
    latents: int


def generate_responses(model, tokenizer, samples: list[dict], *, n: int = 1, temperature: float = 1.0,
                       max_new_tokens: int = 512, seed: int = 0, settings: dict | None = None,
                       suppress: list[int] | None = None, span_at: int | None = None,
                       tau_ema: torch.Tensor | None = None, trace=None) -> list[list[Response]]:
    """``n`` responses per sample (a list per sample) from one batched ``generate`` of a patched model.

    ``suppress``: token ids never sampled (the latent start of a model that was
    not trained to write latents). ``span_at``: every row is made to write the
    latent start token at new position ``span_at`` (so a model that never opens
    a span writes one; it wins over ``suppress``). ``tau_ema``: the running
    calibration target this batch starts from (default: the model's as it is). ``trace``: a
    :class:`gapkern.models.StepTrace` handed to ``generate`` (rows in sample
    order, ``n`` per sample).
    """
    batch = to_model(prompt_batch(model, tokenizer, samples, settings=settings), model)
    prompt_len = batch["input_ids"].shape[1]
    seeds = [derive_seed(seed, sample["id"], j) for sample in samples for j in range(n)]
    processors = [SeededSampler(seeds, prompt_len, temperature)]
    if span_at is not None:
        start = model.gap.config.latent_start_id
        processors.insert(0, ForceTokens(prompt_len, {(row, span_at): start for row in range(len(seeds))}))
    extra = {} if trace is None else {"trace": trace}
    if tau_ema is not None:
        model.gap.tau_ema.copy_(tau_ema)
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
    from .config import PROFILES

    keep = set(tokenizer.convert_tokens_to_ids(list(PROFILES[profile])))
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    drop = (special | set(tokenizer.all_special_ids)) - keep
    return [tokenizer.decode([t for t in row if t not in drop]) for row in sequences.tolist()]


def ema_start(model, samples: list[dict], *, batch: int = 8, settings: dict | None = None) -> torch.Tensor:
    """The running calibration target (1,) float32 a run starts every batch from: the patched model's own, or,
    when it has observed nothing yet (0 or NaN), the ema of the samples' visual input embeddings, fed
    ``batch`` lines at a time in file order as the prefills of an uninterrupted run would feed it."""
    from . import ops
    from .data import image_embeddings

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
