"""output_scores / output_logits of the latent-aware generate: HF's shapes and values where rows sample text,
HF's forced-token rows at latent and end positions, so compute_transition_scores gives them log-probability 0.

Spans are scripted with ForceTokens (random weights never open one), passed to the patched generate, to HF's
and to the naive recomputing loop alike.
"""
from __future__ import annotations

import pytest
import torch

import gapkern
from gapkern.models.qwen2_5_vl import generate as G
from gapkern.testing import tiny_head, tiny_prompts, tiny_qwen2_5_vl
from gapkern.testing import naive_generate

from generate_cases import CACHES, K, ROWS, forcing, hf_and_patched

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 14
KEEP = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0)


def spans(ids):
    """Row 1 writes two spans, row 0 one, row 2 ends with EOS at step 7 (HF keeps scoring it after)."""
    s = ids.latent_start
    return {(1, 0): s, (2, 7): ids.eos, (0, 8): s, (1, 8): s}


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def forced_row(vocab, token):
    row = torch.full((vocab,), float("-inf"))
    row[token] = 0.0
    return row


@pytest.mark.parametrize("static", CACHES)
@pytest.mark.parametrize("sample", [pytest.param(False, id="greedy"), pytest.param(True, id="sample")])
def test_scores_and_logits_match_hugging_face_without_spans(tiny, sample, static):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=2)
    kw = dict(max_new_tokens=10, do_sample=sample, logits_processor=forcing(batch, ids, {(2, 3): ids.eos}), **KEEP)
    if sample:
        kw.update(temperature=0.8, top_k=20)
    ref, out = hf_and_patched(model, ids, batch, static, **kw)
    assert torch.equal(out.sequences, ref.sequences), f"\n{out.sequences}\n{ref.sequences}"
    assert len(out.scores) == len(ref.scores) == len(out.logits) == 10
    for got, want in zip(out.scores + out.logits, ref.scores + ref.logits):
        assert got.shape == want.shape == (3, model.config.text_config.vocab_size) and got.dtype == torch.float32
        close(got, want)
    for normalize in (False, True):
        close(model.compute_transition_scores(out.sequences, out.scores, normalize_logits=normalize),
              model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=normalize))


@pytest.mark.parametrize("static", CACHES)
@pytest.mark.parametrize("pca", [pytest.param(False, id="output-as-input"), pytest.param(True, id="pca-head")])
def test_text_step_scores_match_the_naive_loop_and_forced_positions_score_zero(tiny, pca, static):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    cfg = ids.gap_config(latent_budget=K)
    procs = forcing(batch, ids, spans(ids))
    gapkern.patch(model, tiny_head(model) if pca else None, cfg)
    try:
        want = []
        seq, _, _ = naive_generate(model, batch, cfg, model.gap.head, None, STEPS, procs, scores=want)
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, logits_processor=procs,
                             static_cache=static, **KEEP)
    finally:
        gapkern.unpatch(model)
    assert torch.equal(out.sequences, seq)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    forced = (new == ids.latent_pad) | (new == ids.latent_end)
    assert forced.sum() == 3 * (K + 1)  # the script ran: three spans, each K latents and its end token
    vocab = model.config.text_config.vocab_size
    for i, (scores, logits, ref) in enumerate(zip(out.scores, out.logits, want)):
        # the naive loop recomputes every position and writes float64 latents: the latents' tolerance
        torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)
        for b in range(3):
            if forced[b, i]:
                assert torch.equal(scores[b], forced_row(vocab, new[b, i])) and torch.equal(logits[b], scores[b])
    for kept in (out.scores, out.logits):
        for normalize in (False, True):
            step = model.compute_transition_scores(out.sequences, kept, normalize_logits=normalize)
            assert step.shape == new.shape and torch.equal(step[forced], torch.zeros(int(forced.sum())))
            assert torch.isfinite(step[~forced & (new != ids.pad)]).all()


def test_lm_head_is_skipped_where_no_row_scores_text_even_with_scores_kept(tiny, monkeypatch):
    """Both rows in a span at once: those K + 1 positions are forced for every row, so even with scores kept the
    LM head does not run there; the host reads stay the text steps' ones."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS[:2], seed=1)
    s, budget, steps = ids.latent_start, 3, 8
    procs = forcing(batch, ids, {(0, 0): s, (1, 0): s})
    calls = {"lm_head": 0, "reads": 0}
    hook = model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    to_host = G._to_host
    monkeypatch.setattr(G, "_to_host", lambda t: calls.__setitem__("reads", calls["reads"] + 1) or to_host(t))
    gapkern.patch(model, None, ids.gap_config(latent_budget=budget))
    try:
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, logits_processor=procs, **KEEP)
    finally:
        gapkern.unpatch(model)
        hook.remove()
    assert len(out.scores) == steps and [len(z) for z in out.latents] == [budget, budget]
    assert calls["lm_head"] == steps - (budget + 1)
    assert calls["reads"] == steps - (budget + 1) + 2  # + the prompts' last tokens and the EOS ids


def test_scores_are_kept_only_with_return_dict_in_generate(tiny):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS[:1], seed=1)
    gapkern.patch(model, None, ids.gap_config())
    try:
        plain = model.generate(**batch, max_new_tokens=3, output_scores=True, suppress_tokens=[ids.latent_start])
        out = model.generate(**batch, max_new_tokens=3, return_dict_in_generate=True,
                             suppress_tokens=[ids.latent_start])
    finally:
        gapkern.unpatch(model)
    assert torch.is_tensor(plain) and out.scores is None and out.logits is None  # as HF


# ---- output_hidden_states / output_attentions (issue 17 item 16) ---------------------------------------------

STATES = dict(return_dict_in_generate=True, output_hidden_states=True, output_attentions=True)


@pytest.fixture(scope="module")
def tiny_eager():
    return tiny_qwen2_5_vl(seed=0, attn_implementation="eager")  # sdpa returns no attention weights


def test_hidden_states_and_attentions_match_hugging_face_without_spans(tiny_eager):
    """HF's layout: one entry per new position (the prefill's, then each step's), each the language model's
    per-layer tuple: hidden states (layers + 1) of (B, positions, D), attentions (layers) of (B, heads, q, kv)."""
    model, ids = tiny_eager
    batch = tiny_prompts(ids, ROWS, seed=2)
    kw = dict(max_new_tokens=6, do_sample=False, logits_processor=forcing(batch, ids, {(2, 3): ids.eos}), **STATES)
    ref, out = hf_and_patched(model, ids, batch, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    layers = model.config.text_config.num_hidden_layers
    assert len(out.hidden_states) == len(ref.hidden_states) == len(out.attentions) == 6
    for got, want in zip(out.hidden_states + out.attentions, ref.hidden_states + ref.attentions):
        assert len(got) == len(want) and len(got) in (layers, layers + 1)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            close(a, b)
    assert out.hidden_states[0][0].shape[1] == batch["input_ids"].shape[1] and out.hidden_states[1][0].shape[1] == 1


@pytest.mark.parametrize("static", CACHES)
def test_hidden_states_at_latent_positions_hold_the_latent_fed_back(tiny_eager, static):
    """With spans the step at a latent position feeds the latent: its first hidden state (the input embedding)
    is that latent, and its last is the final-normed state the next latent comes from (the reference's)."""
    model, ids = tiny_eager
    batch = tiny_prompts(ids, ROWS, seed=1)
    cfg = ids.gap_config(latent_budget=K)
    procs = forcing(batch, ids, spans(ids))
    gapkern.patch(model, tiny_head(model), cfg)
    try:
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, logits_processor=procs,
                             static_cache=static, **STATES)
        seq, latents, _ = naive_generate(model, batch, cfg, model.gap.head, None, STEPS, procs)
    finally:
        gapkern.unpatch(model)
    assert torch.equal(out.sequences, seq) and len(out.hidden_states) == STEPS
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    for b in range(new.shape[0]):
        at = [j for j in range(STEPS - 1) if new[b, j] == cfg.latent_pad_id]  # forwarded in entry j + 1
        assert bool(at) == (b < 2), (b, at)  # spans(): rows 0 and 1 write spans, row 2 none
        if not at:
            continue
        fed = torch.stack([out.hidden_states[j + 1][0][b, 0] for j in at]).float()
        close(fed, out.latents[b][:len(at)])
        close(out.latents[b], latents[b].float())
