"""Edge cases of the latent-aware generate (SPEC sections 3 and 5): spans cut by max_new_tokens, EOS
while other rows are mid-span, budget 1 with back-to-back spans, num_return_sequences, repeated calls,
and stopping criteria passed by the caller."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

import gapkern
from gapkern.testing import ForceTokens, tiny_head, tiny_prompts, tiny_qwen2_5_vl
from gapkern.testing import naive_generate

from generate_cases import CACHES, ROWS, forcing

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0)


def assert_same(out, seq, latents):
    assert torch.equal(out.sequences, seq), f"\n{out.sequences}\n{seq}"
    assert [z.shape for z in out.latents] == [z.shape for z in latents]
    for got, want in zip(out.latents, latents):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def against_naive(model, ids, rows, sched, steps, budget, static):
    """generate and naive_generate (no calibration) on the same scripted batch."""
    batch = tiny_prompts(ids, rows, seed=1)
    cfg = ids.gap_config(latent_budget=budget)
    gapkern.patch(model, tiny_head(model), cfg)
    try:
        procs = forcing(batch, ids, sched)
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, logits_processor=procs,
                             return_dict_in_generate=True, static_cache=static)
        seq, latents, _ = naive_generate(model, batch, cfg, model.gap.head, None, steps, procs)
    finally:
        gapkern.unpatch(model)
    assert_same(out, seq, latents)
    return out.sequences[:, batch["input_ids"].shape[1]:], [len(z) for z in out.latents]


@pytest.mark.parametrize("static", CACHES)
def test_max_new_tokens_cuts_a_span_or_lands_on_its_end(tiny, static):
    model, ids = tiny
    s, K = ids.latent_start, 3
    new, counts = against_naive(model, ids, ROWS, {(0, 3): s, (1, 0): s}, 5, K, static)
    assert counts == [1, 3, 0]  # row 0 stops after its first latent, row 1 on its end token
    assert new[0, 3:].tolist() == [s, ids.latent_pad]
    assert new[1].tolist() == [s] + [ids.latent_pad] * K + [ids.latent_end]
    new, counts = against_naive(model, ids, ROWS, {(0, 1): s}, 1 + 1 + K + 1, K, static)
    assert counts == [K, 0, 0] and new[0, -1] == ids.latent_end


@pytest.mark.parametrize("static", CACHES)
def test_eos_while_other_rows_are_mid_span_and_all_finish_early(tiny, static):
    model, ids = tiny
    s, e = ids.latent_start, ids.eos
    new, counts = against_naive(model, ids, ROWS, {(0, 0): s, (1, 1): e, (2, 0): e}, 8, 3, static)
    assert counts == [3, 0, 0] and new[2, 1:].tolist() == [ids.pad] * 7
    new, counts = against_naive(model, ids, ROWS, {(0, 0): s, (0, 4): e, (1, 2): e, (2, 1): e}, 12, 2, static)
    assert new.shape[1] == 5 and counts == [2, 0, 0]  # stops once every row has its EOS


@pytest.mark.parametrize("static", CACHES)
def test_budget_one_back_to_back_spans_and_prompt_start_in_some_rows(tiny, static):
    model, ids = tiny
    s = ids.latent_start
    rows = [(3, (56, 56), True), (5, None), (2, None, True)]
    new, counts = against_naive(model, ids, rows, {(0, 2): s, (2, 2): s, (2, 5): s, (1, 0): s}, 8, 1, static)
    assert counts == [2, 1, 3]
    assert new[2, :6].tolist() == [ids.latent_pad, ids.latent_end, s, ids.latent_pad, ids.latent_end, s]


@pytest.mark.parametrize("static", CACHES)
def test_num_return_sequences_matches_repeated_rows(tiny, static):
    model, ids = tiny
    s = ids.latent_start
    batch = tiny_prompts(ids, ROWS, seed=1)
    dup = {k: batch[k].repeat_interleave(2, 0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    per_image = torch.split(batch["pixel_values"], batch["image_grid_thw"].prod(1).tolist())
    dup["pixel_values"] = torch.cat([p for p in per_image for _ in range(2)])
    dup["image_grid_thw"] = batch["image_grid_thw"].repeat_interleave(2, 0)
    sched = {(0, 0): s, (1, 3): s, (2, 1): s, (3, 1): ids.eos, (5, 2): s}
    kw = dict(max_new_tokens=9, do_sample=True, top_k=1, return_dict_in_generate=True, static_cache=static)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=2, calibration="rms"))
    try:
        a = model.generate(**batch, num_return_sequences=2, logits_processor=forcing(batch, ids, sched), **kw)
        model.gap.tau_ema.zero_()
        b = model.generate(**dup, logits_processor=forcing(dup, ids, sched), **kw)
    finally:
        gapkern.unpatch(model)
    assert [len(z) for z in a.latents] == [2, 2, 2, 0, 0, 2]
    assert_same(a, b.sequences, b.latents)


def test_repeated_calls_on_a_kept_static_decoder_match_dynamic(tiny):
    model, ids = tiny
    s = ids.latent_start
    calls = [(tiny_prompts(ids, [(8, (56, 56)), (3, None)], seed=5), {(0, 0): s, (1, 2): s}, 10),
             (tiny_prompts(ids, [(2, None, True), (1, (28, 56))], seed=6), {(1, 0): s, (0, 5): ids.eos}, 7)]
    calls.append(calls[0])
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=3, calibration="ema"))
    try:
        runs = {}
        for static in (False, True):
            model.gap.tau_ema.zero_()
            runs[static] = [model.generate(**b, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                                           logits_processor=forcing(b, ids, sc), static_cache=static)
                            for b, sc, n in calls]
            if static:
                assert model.gap.decoder is not None
    finally:
        gapkern.unpatch(model)
    for dyn, sta in zip(runs[False], runs[True]):
        assert_same(sta, dyn.sequences, dyn.latents)


def test_the_latent_step_is_checked_once_per_decoder_not_every_step(tiny, monkeypatch):
    """The decoder binds the latent step (ops.bind_latent_step): its arguments are validated and the
    backend resolved when the decoder is made, and each latent goes straight to the kernel."""
    from gapkern.ops import step
    model, ids = tiny
    checks = []
    real = step.check
    monkeypatch.setattr(step, "check", lambda *a, **k: checks.append(1) or real(*a, **k))
    batch = tiny_prompts(ids, [(4, (56, 56)), (3, None)], seed=2)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=3, calibration="ema"))
    try:
        for static, made in ((False, 1), (True, 1), (True, 0)):  # the kept static decoder binds nothing again
            checks.clear()
            out = model.generate(**batch, max_new_tokens=9, do_sample=False, return_dict_in_generate=True,
                                 logits_processor=forcing(batch, ids, {(0, 0): ids.latent_start,
                                                                       (1, 1): ids.latent_start}),
                                 static_cache=static)
            assert [len(z) for z in out.latents] == [3, 3]  # six latents written ...
            assert len(checks) == made, (static, len(checks))  # ... with one check (or none) in all
    finally:
        gapkern.unpatch(model)


@pytest.mark.parametrize("static", CACHES)
@pytest.mark.parametrize("kind", ["max_length", "eos"])
def test_stopping_criteria_passed_by_the_caller_are_honoured(tiny, kind, static):
    """HF lets a caller's MaxLengthCriteria / EosTokenCriteria replace the default one; so must generate."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS[:2], seed=2)
    length = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=10, do_sample=False, suppress_tokens=[ids.latent_start])
    plain = model.generate(**batch, **kw)
    crit = MaxLengthCriteria(length + 3) if kind == "max_length" else EosTokenCriteria(int(plain[0, length + 3]))
    kw["stopping_criteria"] = StoppingCriteriaList([crit])
    ref = model.generate(**batch, **kw)
    assert not torch.equal(ref, plain)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=2))
    try:
        out = model.generate(**batch, static_cache=static, **kw)
    finally:
        gapkern.unpatch(model)
    assert torch.equal(out, ref), f"\n{out}\n{ref}"


def test_bad_inputs_fail_up_front_naming_the_argument(tiny):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    one = {k: v[1:2] if k != "pixel_values" and k != "image_grid_thw" else v for k, v in batch.items()}
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=2))
    try:
        def check(match, **kw):
            with pytest.raises(ValueError, match=match):
                model.generate(**kw, max_new_tokens=3)

        check(r"input_ids: empty prompts \(shape \(1, 0\)\)", input_ids=torch.zeros(1, 0, dtype=torch.long))
        check(r"input_ids: empty prompts", input_ids=torch.zeros(2, 0, dtype=torch.long),
              attention_mask=torch.zeros(2, 0, dtype=torch.long))
        check(r"input_ids: no rows \(shape \(0, 4\)\)", input_ids=torch.zeros(0, 4, dtype=torch.long),
              attention_mask=torch.zeros(0, 4, dtype=torch.long))
        check(r"attention_mask: rows \[0\] mask out their whole prompt",
              **{**batch, "attention_mask": batch["attention_mask"] * torch.tensor([[0], [1], [1]])})
        check("image_grid_thw: required with pixel_values", **{k: v for k, v in batch.items() if k != "image_grid_thw"})
        # two images' patches for a prompt with one image's tokens: the extra embeddings must not vanish silently
        check("pixel_values: 10 image embeddings for 4 image tokens", **one)
    finally:
        gapkern.unpatch(model)


@pytest.mark.parametrize("static", CACHES)
@pytest.mark.parametrize("layout", ["gap", "monet"])
def test_the_latent_step_runs_only_at_positions_where_a_row_feeds_a_latent(tiny, monkeypatch, layout, static):
    """Issue 20 item 5: the eager step skips the bound latent step when the host mirror finds no row feeding a
    latent (it would write no row), and the monet layout's latents chosen after sampling run it only when a row
    takes one. So every call writes some row, once per position holding a fed latent (gap: a placeholder;
    monet: a placeholder or the start token that opened the span), and the output is the reference's."""
    from gapkern import ops

    model, ids = tiny
    calls = []
    real = ops.bind_latent_step

    def counting(*args, **kw):
        step, mask = real(*args, **kw), kw["latent_mask"]
        return lambda hidden: calls.append(int(mask.sum())) or step(hidden)

    monkeypatch.setattr(ops, "bind_latent_step", counting)
    batch = tiny_prompts(ids, ROWS, seed=1)
    cfg = ids.gap_config(latent_budget=3, profile=layout, span_layout=layout)
    s, e = ids.latent_start, ids.latent_end
    sched = {(0, 1): s, (1, 6): s, (1, 11): s, (2, 2): ids.eos} if layout == "gap" else {
        (0, 1): s, (0, 3): e, (1, 6): s, (2, 2): ids.eos}
    banned = [s] if layout == "gap" else [s, e]
    procs = LogitsProcessorList([ForceTokens(batch["input_ids"].shape[1], sched, banned=banned)])
    steps = 14
    gapkern.patch(model, tiny_head(model), cfg)
    try:
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, logits_processor=procs,
                             return_dict_in_generate=True, static_cache=static)
    finally:
        gapkern.unpatch(model)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    fed = (new == cfg.latent_pad_id) | ((new == s) if layout == "monet" else False)
    assert calls and all(n > 0 for n in calls), calls  # no call that writes no row
    assert len(calls) == int(fed.any(0).sum()) < steps, (calls, new)
    seq, latents, _, *_ = naive_generate(model, batch, cfg, tiny_head(model), None, steps, procs)
    assert_same(out, seq, latents)
