"""The seeded draw of :class:`gapkern.sampling.SeededSampler` (issue 20 item 6): one counter-based uniform per row,
batched, and inverse-CDF sampling of the tempered softmax. The draw's properties as curation relies on them
(SPEC 4.4: attempt j of a line drawn from ``derive_seed(seed, id, j)`` alone) are in tests/pipeline/test_curate.py; these
check the hash against plain integer arithmetic and the sampler's edges."""
from __future__ import annotations

import random

import pytest
import torch

import gapkern.sampling as S
from gapkern.sampling import SeededSampler, counter_uniform, derive_seed

M64 = 2 ** 64 - 1


def mix64(z: int) -> int:
    """SplitMix64's finalizer on Python ints (arbitrary precision, reduced mod 2**64 by hand)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def uniform(seed: int, counter: int) -> float:
    z = mix64((mix64(seed) + (counter + 1) * 0x9E3779B97F4A7C15) & M64)
    return ((z >> 12) + 0.5) / 2 ** 52


def test_counter_uniform_is_splitmix64_exactly():
    """SplitMix64 as S. Vigna's reference C (prng.di.unimi.it/splitmix64.c: ``z = (x += 0x9e3779b97f4a7c15)``,
    then the two xor-shift-multiplies and ``z ^ (z >> 31)``), here on Python ints; its first output from state 0 is
    the published 0xe220a8397b1dcdaf."""
    assert mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    rng = random.Random(0)
    seeds = [0, 1, 2 ** 63 - 1, 2 ** 32, 2 ** 32 - 1] + [rng.randrange(2 ** 63) for _ in range(200)]
    keys = S.row_keys(seeds)
    for counter in (0, 1, 7, 2 ** 31, 2 ** 32 - 1, 2 ** 32 + 5, 2 ** 40):
        got = counter_uniform(keys, counter).tolist()
        assert got == [uniform(s, counter) for s in seeds]
        assert all(0.0 < u < 1.0 for u in got)
    top = torch.tensor([((2 ** 52 - 1) + 0.5) / 2 ** 52], dtype=torch.float64)
    assert top.item() < 1.0  # the largest draw stays below 1 in float64


def test_counter_uniform_looks_uniform_and_independent():
    keys = S.row_keys([derive_seed(7, i) for i in range(40000)])
    u0, u1 = counter_uniform(keys, 0), counter_uniform(keys, 1)
    for u in (u0, u1):
        counts = torch.bincount((u * 20).long(), minlength=20).double()
        chi2 = ((counts - 2000) ** 2 / 2000).sum().item()
        assert chi2 < 45.3  # chi-square, 19 degrees of freedom: p = 0.001
    corr = torch.corrcoef(torch.stack([u0, u1]))[0, 1].abs().item()
    assert corr < 4 / 40000 ** 0.5  # adjacent positions of one key: uncorrelated
    near = torch.corrcoef(torch.stack([u0[:-1], u0[1:]]))[0, 1].abs().item()
    assert near < 4 / 40000 ** 0.5  # neighbouring keys


def test_batched_draw_equals_one_row_at_a_time():
    """A row's token depends on its seed, its position and its scores only (a 64-row batch of a 1000-token
    vocabulary, each row drawn alone again)."""
    torch.manual_seed(0)
    scores = torch.randn(64, 1000) * 3
    seeds = [derive_seed(1, i) for i in range(64)]
    batch = SeededSampler(seeds, prompt_len=2, temperature=0.8)
    ids = torch.zeros(64, 2 + 5, dtype=torch.long)
    picks = batch(ids, scores).argmax(1)
    for row in range(64):
        alone = SeededSampler([seeds[row]], prompt_len=10, temperature=0.8)
        assert alone(torch.zeros(1, 15, dtype=torch.long), scores[row:row + 1]).argmax(1).item() == picks[row]


def test_draw_never_picks_a_zero_probability_token(monkeypatch):
    """Masked tokens (-inf, e.g. suppressed or outside top-k) are never drawn, also when u * total rounds to the
    total (the clamp to the last token of positive weight) or u is tiny (the first)."""
    logits = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.5, float("-inf")]] * 3)
    for u, expected in ((1.0 - 2 ** -53, 3), (2.0 ** -54, 1)):
        monkeypatch.setattr(S, "counter_uniform", lambda keys, counter, u=u: torch.full((len(keys),), u, dtype=torch.float64))
        sampler = SeededSampler([1, 2, 3], prompt_len=1)
        assert sampler(torch.zeros(3, 1, dtype=torch.long), logits).argmax(1).tolist() == [expected] * 3
    monkeypatch.setattr(S, "counter_uniform", lambda keys, counter: torch.ones((len(keys),), dtype=torch.float64))
    sampler = SeededSampler([1, 2, 3], prompt_len=1)  # u = 1 exactly: past the total, clamped
    assert sampler(torch.zeros(3, 1, dtype=torch.long), logits).argmax(1).tolist() == [3] * 3


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_draw_samples_the_tempered_softmax_of_a_large_vocabulary(temperature):
    """Frequencies within 4 binomial standard errors of softmax(scores / T), 20000 draws over 5000 tokens
    (the 8 most likely tokens checked one by one, the rest as one bin)."""
    torch.manual_seed(1)
    logits = torch.randn(5000) * 2
    n = 20000
    sampler = SeededSampler([derive_seed(3, i) for i in range(n)], prompt_len=1, temperature=temperature)
    picks = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1)).argmax(1)
    expected = torch.softmax(logits.double() / temperature, 0)
    top = expected.argsort(descending=True)[:8]
    freq = torch.bincount(picks, minlength=5000).double() / n
    p = torch.cat([expected[top], (1 - expected[top].sum())[None]])
    f = torch.cat([freq[top], (1 - freq[top].sum())[None]])
    assert ((f - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12).all()
