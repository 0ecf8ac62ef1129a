"""Seeded, batch-independent draws: a line's attempt ``j`` from ``derive_seed(seed, id, j)`` alone.

:func:`derive_seed` names a draw's seed; :class:`SeededSampler` draws each row's token from its seed and its new
position only (one counter-based uniform per row, :func:`counter_uniform`), so a line's response does not depend
on the other lines of a batch, on the number of ranks, or on where a run was resumed; :class:`ForceTokens`
scripts tokens (a latent span at a given position). The responses themselves (one batched, patched
``generate``) are :mod:`gapkern.stages.responses`.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import LogitsProcessor

__all__ = ["derive_seed", "counter_uniform", "row_keys", "SeededSampler", "ForceTokens"]


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


_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2**64 / the golden ratio, odd
_M64 = 2 ** 64 - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (S. Vigna) on uint64 arrays: a bijection of [0, 2**64) whose output bits each depend
    on every input bit. uint64 arithmetic wraps modulo 2**64 by definition, as the mixer needs."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_keys(seeds) -> np.ndarray:
    """Each seed's key for :func:`counter_uniform`: the seeds (ints in [0, 2**64)) mixed once."""
    return _mix64(np.asarray([int(s) & _M64 for s in seeds], dtype=np.uint64))


def counter_uniform(keys: np.ndarray, counter: int) -> torch.Tensor:
    """One float64 uniform in (0, 1) per key (:func:`row_keys`) at ``counter`` (a non-negative int, the new
    position): SplitMix64's ``counter``-th output of the stream the key starts, ``mix(key + (counter + 1) *
    golden)``, so a pure function of (seed, counter), drawn for all rows at once (no generator, no per-row work)
    and the same on every machine. 52 random bits per draw."""
    z = _mix64(keys + np.uint64(((counter + 1) * _GOLDEN) & _M64))
    return torch.from_numpy(((z >> np.uint64(12)).astype(np.float64) + 0.5) * 2.0 ** -52)  # (0, 1): 52 bits + 0.5 exact


class SeededSampler(LogitsProcessor):
    """Draws row ``b``'s token from ``softmax(scores / temperature)`` with a uniform seeded by ``(seeds[b], step)``.

    Inverse-CDF sampling: ``u = counter_uniform(seed, step)`` picks the token whose interval of the row's
    cumulative weights ``cumsum(exp((scores - max) / T))`` holds ``u * total``: one uniform per row, drawn
    for all rows at once by a counter-based generator (SplitMix64 keyed by the seed), then one exp, one cumsum
    and one search over the batch. ``u`` is a function of the row's seed and its new position only: not of the
    other rows (``do_sample``'s multinomial draws the whole batch from one stream), nor of how many steps sampled
    before (the patched generate samples no token while every row writes latents). Every op is row-wise
    (the max is exact in any order, the cumulative sum runs along the row), so a row draws the same token
    in any batch. The returned scores are 0 at the drawn token and -inf elsewhere, so ``do_sample`` and any
    warper after this one can only pick it. ``temperature=0``: greedy.
    """

    def __init__(self, seeds: list[int], prompt_len: int, temperature: float = 1.0):
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        self.seeds, self.prompt_len, self.temperature = list(seeds), prompt_len, float(temperature)
        self._keys = row_keys(self.seeds)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"scores: expected {len(self.seeds)} rows (one per seed), got {scores.shape[0]}")
        logits = scores.float()
        if self.temperature > 0:
            picks = self.draw(logits, input_ids.shape[1] - self.prompt_len)
        else:
            picks = logits.argmax(-1)
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter_(1, picks[:, None], 0.0)

    def draw(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The drawn token of each row at new position ``step``: (B,) int64."""
        weights = logits - logits.max(-1, keepdim=True).values
        weights = weights.div_(self.temperature).exp_()  # in [0, 1], 1 at the row's top token
        cdf = torch.cumsum(weights, -1, dtype=torch.float64)
        total = cdf[:, -1]
        # u < 1, but u * total may round up to the total: keep the target below it, so the first cdf above the
        # target exists and its token has positive weight (a masked token adds nothing to the cdf: never drawn)
        below = torch.nextafter(total, torch.zeros_like(total))
        target = torch.minimum(counter_uniform(self._keys, step).to(logits.device) * total, below)
        return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
