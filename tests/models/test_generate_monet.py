"""The ``monet`` span layout (SPEC section 3) against a reference written here from Monet's released runner.

Monet decodes with a patched vLLM model runner, ``inference/vllm/monet_gpu_model_runner.py`` of
NOVAglow646/Monet (commit 0893999), in its "ABS-VIS" blocks:

- lines 323-346: ``LATENT_START_ID``, ``LATENT_END_ID`` and ``LATENT_SIZE`` (K; 10 for the released models)
  and one ``{"active", "pending", "current_len"}`` state per request;
- lines 1641-1665, after sampling: a request not active that sampled the start token becomes active; an
  active one that sampled the end token, or already fed ``current_len >= LATENT_SIZE`` latents, becomes
  inactive and its token is replaced by the end token; a request still active keeps this step's last
  hidden state as ``pending`` and counts it (``current_len += 1``);
- lines 1434-1466, before the next forward: an active request's ``pending`` hidden state replaces the
  input embedding at the position of the token it just wrote (so latent 1 sits at the start token's own
  position, the start embedding is never fed), and the LM head keeps running inside a span.

:func:`monet_reference` is that rule, per row, on a loop with no cache that recomputes the whole sequence
every step; the only departures are SPEC's: the returned sequence holds the placeholder where Monet's runner
keeps the (ignored) sampled id, the fed latent is SPEC section 2's (head, calibration) of the hidden state,
and a prompt that already ends in the start token (Monet's runner never meets one) feeds latent 1 from the
prompt's last hidden state without sampling. Random weights never open or close a span on their own:
:class:`~gapkern.testing.ForceTokens` forces the start, end and EOS tokens where the script says and bans
the start and end tokens everywhere else, for the reference and the patched generate alike.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

import gapkern
from gapkern.testing import ForceTokens, latent_step64, naive_generate, tiny_head, tiny_prompts, tiny_qwen2_5_vl

from generate_cases import CACHES, ROWS, dynamic_and_warmed_up
from test_generate import reference_tau

pytestmark = pytest.mark.usefixtures("one_thread")

K = 10  # the monet profile's default (Monet's LATENT_SIZE)
STEPS = 24
CALIBRATIONS = ["none", "rms", "ema"]
HEADS = [pytest.param(False, id="output-as-input"), pytest.param(True, id="pca-head")]
KEEP = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


@pytest.fixture(scope="module")
def tiny():
    """float64: on random weights a span of 10 fed-back hidden states doubles float32's rounding at every
    latent (1e-6 to 1e-3 over a span), in float64 the cached and recomputed loops agree to rounding."""
    return tiny_qwen2_5_vl(seed=0, dtype=torch.float64)


def schedule(ids):
    """Row 0: a span that runs full (start at 0, K-1 placeholders, the end forced at K), a start sampled inside
    it (a placeholder), then a span the model closes at 17 (sampled end). Row 1: a span closed early at 5, then
    one that runs full from 8 (while row 0 writes text). Row 2: text, EOS at 6 (it finishes inside row 0's
    and row 1's spans)."""
    s, e = ids.latent_start, ids.latent_end
    return {(0, 0): s, (0, 5): s, (0, 14): s, (0, 17): e, (1, 3): s, (1, 5): e, (1, 8): s, (2, 6): ids.eos}


def forcing(batch, ids, sched):
    return LogitsProcessorList([ForceTokens(batch["input_ids"].shape[1], sched,
                                            banned=[ids.latent_start, ids.latent_end])])


def forced_row(scores, token):
    """HF's forced-token row: 0 at ``token``, -inf elsewhere."""
    row = torch.full_like(scores, float("-inf"))
    row[token] = 0.0
    return row


@torch.no_grad()
def monet_reference(model, batch, cfg, head, tau, steps, procs):
    """Monet's runner's span rule (module docstring), greedy, recomputing the whole sequence every step.

    Returns (sequences, per row the float32 latents fed, per step the (B, V) scores and logits as SPEC says
    the output keeps them: the step's processed scores / logits where the row wrote the token it sampled, the
    forced-token row where the token written replaced it (placeholder, forced end) or nothing was sampled).
    """
    lm, embed = model.model.language_model, model.get_input_embeddings()
    input_ids, att = batch["input_ids"], batch["attention_mask"]
    rows = input_ids.shape[0]
    embeds = embed(input_ids)
    if "pixel_values" in batch:
        feats = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter((input_ids == model.config.image_token_id)[..., None], feats.to(embeds.dtype))
    pos, _ = model.model.get_rope_index(input_ids, batch["mm_token_type_ids"],
                                        image_grid_thw=batch.get("image_grid_thw"), attention_mask=att)
    start, end, placeholder = cfg.latent_start_id, cfg.latent_end_id, cfg.latent_pad_id
    pad, eos = model.generation_config.pad_token_id or 0, {model.generation_config.eos_token_id}
    # Monet's per-request state; "prompt": the prompt ends in the start token (SPEC's case, not Monet's)
    state = [{"active": t == start, "pending": None, "current_len": 0, "prompt": t == start}
             for t in input_ids[:, -1].tolist()]
    done, latents, seq, scores, logits = [False] * rows, [[] for _ in range(rows)], input_ids, [], []
    for _ in range(steps):
        hidden = lm(inputs_embeds=embeds, attention_mask=att, position_ids=pos).last_hidden_state[:, -1]
        step_logits = model.lm_head(hidden).float()
        step_scores = procs(seq, step_logits)
        tokens, nxt, kept_scores, kept_logits = [], [], [], []
        for b, st in enumerate(state):
            if done[b]:
                sampled = written = pad
            elif st["prompt"]:  # latent 1 from the prompt's own start token: nothing sampled here
                st["prompt"], sampled, written = False, None, placeholder
                st["pending"], st["current_len"] = hidden[b], 1
            else:
                sampled = written = int(step_scores[b].argmax())
                was_active = st["active"]
                if not st["active"] and sampled == start:
                    st["active"] = True
                elif st["active"] and (sampled == end or st["current_len"] >= K):
                    st["active"], st["pending"], st["current_len"], written = False, None, 0, end
                if st["active"]:
                    st["pending"] = hidden[b]
                    st["current_len"] += 1
                    if was_active:  # SPEC: the placeholder where Monet keeps the ignored sample
                        written = placeholder
                done[b] = not was_active and written in eos
            if st["active"]:  # the pending hidden state is the input at the position just written
                z = latent_step64(st["pending"], head, None if tau is None else tau[b], cfg.eps).to(embeds.dtype)
                latents[b].append(z)
                nxt.append(z)
            else:
                nxt.append(embed.weight[written])
            tokens.append(written)
            same = sampled == written
            kept_scores.append(step_scores[b] if same else forced_row(step_scores[b], written))
            kept_logits.append(step_logits[b] if same else forced_row(step_logits[b], written))
        scores.append(torch.stack(kept_scores))
        logits.append(torch.stack(kept_logits))
        seq = torch.cat([seq, torch.tensor(tokens, device=seq.device)[:, None]], 1)
        embeds = torch.cat([embeds, torch.stack(nxt)[:, None]], 1)
        pos = torch.cat([pos, pos[:, :, -1:] + 1], 2)
        att = torch.cat([att, torch.ones(rows, 1, dtype=att.dtype, device=att.device)], 1)
        if all(done):
            break
    stacked = [torch.stack(z).float() if z else embeds.new_zeros(0, embeds.shape[-1]).float() for z in latents]
    return seq, stacked, scores, logits


def run(model, ids, head, calibration, static=False, rows=ROWS, sched=None, steps=STEPS, **kw):
    """The reference's and the patched generate's outputs on the monet profile (monet layout, K = 10)."""
    batch = tiny_prompts(ids, rows, seed=1)
    cfg = ids.gap_config(profile="monet", calibration=calibration)
    assert (cfg.span_layout, cfg.latent_budget) == ("monet", K)
    gapkern.patch(model, head, cfg)
    try:
        procs = forcing(batch, ids, schedule(ids) if sched is None else sched)
        tau, _ = reference_tau(model, batch, ids, calibration)
        if tau is not None:  # SPEC section 2: tau is float32
            tau = torch.tensor(tau, dtype=torch.float32).tolist()
        ref = monet_reference(model, batch, cfg, model.gap.head, tau, steps, procs)
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, logits_processor=procs,
                             static_cache=static, **KEEP, **kw)
    finally:
        gapkern.unpatch(model)
    return out, ref


def assert_same(out, ref):
    seq, latents, scores, logits = ref
    assert torch.equal(out.sequences, seq), f"\n{out.sequences}\n{seq}"
    assert [len(z) for z in out.latents] == [len(z) for z in latents]
    for got, want in zip(out.latents, latents):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(out.scores) == len(scores) == len(out.logits)
    for got, want in zip(out.scores + out.logits, scores + logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static", CACHES)
@pytest.mark.parametrize("calibration", CALIBRATIONS)
@pytest.mark.parametrize("pca", HEADS)
def test_monet_layout_matches_monets_runner(tiny, pca, calibration, static):
    model, ids = tiny
    out, ref = run(model, ids, tiny_head(model, rank=8) if pca else None, calibration, static)
    assert_same(out, ref)
    # the script ran as planned: full spans of K latents over K+1 positions, early closes
    new = out.sequences[:, -STEPS:].tolist()
    s, e, p = ids.latent_start, ids.latent_end, ids.latent_pad
    assert new[0][:K + 1] == [s] + [p] * (K - 1) + [e]
    assert new[0][14:18] == [s, p, p, e]
    assert new[1][3:6] == [s, p, e] and new[1][8:8 + K + 1] == [s] + [p] * (K - 1) + [e]
    assert ids.eos in new[2] and set(new[2][new[2].index(ids.eos) + 1:]) == {ids.pad}
    assert [len(z) for z in out.latents] == [K + 3, 2 + K, 0]
    if calibration != "none":
        tau, _ = reference_tau(model, tiny_prompts(ids, ROWS, seed=1), ids, calibration)
        norms = out.latents[1].double().norm(dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, tau[1]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("static", CACHES)
def test_monet_prompt_ending_with_start_token(tiny, static):
    """Rows 0 and 2 start in latent mode: latent 1 from the prompt's last hidden state (not sampled), then the
    monet rules (row 0 runs full, row 2 samples the end after 3 latents)."""
    model, ids = tiny
    rows = [(3, (56, 56), True), (5, None), (2, None, True)]
    sched = {(2, 3): ids.latent_end, (1, 2): ids.latent_start}
    out, ref = run(model, ids, tiny_head(model), "rms", static, rows=rows, sched=sched, steps=K + 3)
    assert_same(out, ref)
    new = out.sequences[:, -(K + 3):].tolist()
    p = ids.latent_pad
    assert new[0][:K + 1] == [p] * K + [ids.latent_end]
    assert new[2][:4] == [p] * 3 + [ids.latent_end]
    assert [len(z) for z in out.latents] == [K, K, 3]


def test_monet_eos_sampled_inside_a_span_is_a_placeholder(tiny):
    """SPEC section 3: inside a span, a sampled token other than the end token becomes the placeholder; EOS
    there does not finish the row (row 1 samples EOS at 5, inside its span, and later at 14, in text)."""
    model, ids = tiny
    sched = {(1, 3): ids.latent_start, (1, 5): ids.eos, (1, 14): ids.eos}
    out, ref = run(model, ids, None, "none", sched=sched, steps=18)
    assert_same(out, ref)
    new = out.sequences[1, -18:].tolist()
    assert new[3:3 + K + 1] == [ids.latent_start] + [ids.latent_pad] * (K - 1) + [ids.latent_end]
    assert new[14] == ids.eos and set(new[15:]) == {ids.pad}


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_naive_generate_takes_the_monet_layout(tiny, calibration):
    """gapkern.testing.naive_generate (the benchmarks' and other tests' reference) decodes the monet layout as
    the reference above does, scores included."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    cfg = ids.gap_config(profile="monet", calibration=calibration)
    procs = forcing(batch, ids, schedule(ids))
    tau, _ = reference_tau(model, batch, ids, calibration)
    head = tiny_head(model, rank=8)
    scores = []
    seq, latents, text_steps = naive_generate(model, batch, cfg, head, tau, STEPS, procs, scores=scores)
    want_seq, want_latents, want_scores, _ = monet_reference(model, batch, cfg, head, tau, STEPS, procs)
    assert torch.equal(seq, want_seq)
    for got, want in zip(latents + scores, want_latents + want_scores):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(text_steps)  # the monet layout samples at every step of a span


def test_monet_graph_warm_up_leaves_no_trace(tiny, monkeypatch):
    """The graph path's code on the CPU (capture stands in as the warm-up that runs the step twice and undoes
    it; the monet layout's latents chosen after sampling are written outside the graph)."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    kw = dict(max_new_tokens=STEPS, do_sample=False, logits_processor=forcing(batch, ids, schedule(ids)), **KEEP)
    dynamic, warmed = dynamic_and_warmed_up(model, tiny_head(model), ids.gap_config(profile="monet", calibration="rms"),
                                            batch, monkeypatch, **kw)
    assert torch.equal(warmed.sequences, dynamic.sequences)
    for a, b in zip(warmed.latents + warmed.scores, dynamic.latents + dynamic.scores):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_monet_cuda_graph_matches_the_reference_on_gpu(dtype):
    """The captured step (and the eager static one) in the monet layout; float32 against the reference."""
    model, ids = tiny_qwen2_5_vl(seed=0, dtype=dtype)
    model = model.cuda()
    batch = tiny_prompts(ids, ROWS, seed=1, device="cuda")
    procs = forcing(batch, ids, schedule(ids))
    kw = dict(max_new_tokens=STEPS, do_sample=False, logits_processor=procs, **KEEP)
    gapkern.patch(model, None, ids.gap_config(profile="monet"))
    try:
        eager = model.generate(**batch, cuda_graph=False, static_cache=True, **kw)
        graphed = model.generate(**batch, cuda_graph=True, **kw)
        assert model.gap.decoder.graph is not None
        if dtype == torch.float32:
            seq, latents, _, _ = monet_reference(model, batch, model.gap.config, None, None, STEPS, procs)
            assert torch.equal(graphed.sequences.cpu(), seq.cpu())
    finally:
        gapkern.unpatch(model)
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b in zip(graphed.latents, eager.latents):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
