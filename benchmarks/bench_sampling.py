"""Curation's sampling (issue 20 item 6): the seeded per-line draw against the draw of HF's ``do_sample``.

- ``draw``: one token per row from (B, V) logits: :class:`gapkern.sampling.SeededSampler` (each row's uniform a
  function of its seed and position, one batched integer hash, then exp / cumsum / search) vs softmax and
  ``torch.multinomial`` (what ``do_sample`` runs: one stream for the whole batch, so not per-line reproducible).
  B = 64 rows (8 lines x 8 attempts), V = 1000 and Qwen2.5-VL's 152064 (float32).
- ``curate``: 8 sampled responses of 16 new tokens to one prompt on the tiny random Qwen2.5-VL: the patched
  ``generate`` with the seeded draw (the curate path) vs the unpatched model's
  ``generate(do_sample=True, num_return_sequences=8)``. EOS and the latent start are banned, so both write
  every position.

The ratio seeded / multinomial (and patched / hf) per group: ``python -m benchmarks.report RESULTS.json``.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

import gapkern
from gapkern.sampling import SeededSampler, derive_seed
from gapkern.testing import ForceTokens, tiny_head, tiny_prompts, tiny_qwen2_5_vl

from conftest import DEVICE

ROWS, ATTEMPTS, NEW = 64, 8, 16


@pytest.mark.usefixtures("one_cpu_thread")
@pytest.mark.parametrize("vocab", [1000, 152064])
@pytest.mark.parametrize("impl", ["multinomial", "seeded"])
def test_draw(measure, benchmark, impl, vocab):
    benchmark.group = f"draw B{ROWS} V{vocab}"
    torch.manual_seed(0)
    logits = torch.randn(ROWS, vocab, device=DEVICE) * 3
    ids = torch.zeros(ROWS, 9, dtype=torch.long, device=DEVICE)
    if impl == "seeded":
        sampler = SeededSampler([derive_seed(0, row) for row in range(ROWS)], prompt_len=4, temperature=0.7)
        fn = lambda: sampler(ids, logits)  # noqa: E731
    else:
        fn = lambda: torch.multinomial(torch.softmax(logits / 0.7, -1), 1)  # noqa: E731
    measure(fn, logits.numel() * logits.element_size(), op="draw", impl=impl, B=ROWS, V=vocab, device=DEVICE)


@pytest.fixture(scope="module")
def tiny():
    model, ids = tiny_qwen2_5_vl(seed=0, device=DEVICE)
    batch = tiny_prompts(ids, [(16, (56, 56))], seed=0, device=DEVICE)
    return model, ids, batch


@pytest.mark.usefixtures("one_cpu_thread")
@pytest.mark.parametrize("impl", ["hf", "patched"])
def test_curate(measure, benchmark, tiny, impl):
    model, ids, batch = tiny
    benchmark.group = f"curate {ATTEMPTS} responses x {NEW} new tokens"
    prompt_len = batch["input_ids"].shape[1]
    procs = [ForceTokens(prompt_len, {}, banned=[ids.latent_start, ids.eos])]
    if impl == "patched":
        gapkern.patch(model, tiny_head(model, rank=8), ids.gap_config(latent_budget=4))
        procs.append(SeededSampler([derive_seed(0, "q", j) for j in range(ATTEMPTS)], prompt_len, 1.0))
    kw = dict(do_sample=True, num_return_sequences=ATTEMPTS, max_new_tokens=NEW,
              logits_processor=LogitsProcessorList(procs))
    try:
        measure(lambda: model.generate(**batch, **kw), 0, inner=1, op="curate", impl=impl, n=ATTEMPTS, new=NEW,
                model="tiny Qwen2.5-VL, random weights", device=DEVICE)
    finally:
        gapkern.unpatch(model)
