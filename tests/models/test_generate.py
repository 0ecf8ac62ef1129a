"""The latent-aware generate (SPEC section 3) against a naive loop and against Hugging Face.

Random weights never open a latent span on their own, so every test scripts
the spans with ``ForceTokens``, one logits processor passed to both the
patched generate and the naive loop: it forces the start token (or EOS) for a
given row at a given new position and bans the start token everywhere else.
Both paths call the same pure processor on the same sequence, so they make
the same choices.
"""
from __future__ import annotations

import pytest
import torch

import gapkern
from gapkern.models.qwen2_5_vl import generate as G
from gapkern.testing import tiny_head, tiny_prompts, tiny_qwen2_5_vl
from gapkern.testing import naive_generate

from generate_cases import CACHES, K, ROWS, dynamic_and_warmed_up, forcing, hf_and_patched

STEPS = 14


def schedule(ids):
    """Row 1 writes two spans, row 0 one, row 2 none (it ends with EOS at step 7).

    Steps 1-2 mix latent and text rows; steps 9-11 have no live text row.
    """
    s = ids.latent_start
    return {(1, 0): s, (2, 7): ids.eos, (0, 8): s, (1, 8): s}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, ids = tiny_qwen2_5_vl(seed=0)
    return model, ids


def image_norms(model, batch, ids):
    """Per-row lists of visual-embedding norms, computed apart from gapkern."""
    rows = [[] for _ in range(batch["input_ids"].shape[0])]
    if "pixel_values" not in batch:
        return rows
    with torch.no_grad():
        feats = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
    norms = feats.double().norm(dim=-1).tolist()
    counts = (batch["input_ids"] == ids.image_pad).sum(1).tolist()
    for b, n in enumerate(counts):
        rows[b], norms = norms[:n], norms[n:]
    return rows


def reference_tau(model, batch, ids, mode, ema=0.0, decay=0.99):
    """SPEC section 2's targets: rms per row (ema for rows without image), ema over the batch."""
    if mode == "none":
        return None, ema
    rows = image_norms(model, batch, ids)
    flat = [n for r in rows for n in r]
    if flat:
        m = sum(flat) / len(flat)
        ema = m if ema <= 0 else decay * ema + (1 - decay) * m
    if mode == "ema":
        return [ema] * len(rows), ema
    return [sum(r) / len(r) if r else ema for r in rows], ema


def assert_same_generation(out, ref_seq, ref_latents):
    assert torch.equal(out.sequences, ref_seq), f"\n{out.sequences}\n{ref_seq}"
    assert len(out.latents) == len(ref_latents)
    for got, want in zip(out.latents, ref_latents):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def run_case(model, ids, head, calibration, static=False, rows=ROWS, sched=None, steps=STEPS):
    batch = tiny_prompts(ids, rows, seed=1)
    cfg = ids.gap_config(latent_budget=K, calibration=calibration)
    gapkern.patch(model, head, cfg)
    try:
        procs = forcing(batch, ids, schedule(ids) if sched is None else sched)
        tau, _ = reference_tau(model, batch, ids, calibration)
        ref = naive_generate(model, batch, cfg, model.gap.head, tau, steps, procs)
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, logits_processor=procs,
                             return_dict_in_generate=True, static_cache=static)
    finally:
        gapkern.unpatch(model)
    return out, ref


HEADS = [pytest.param(False, id="output-as-input"), pytest.param(True, id="pca-head")]
CALIBRATIONS = ["none", "rms", "ema"]


@pytest.mark.parametrize("static", CACHES)
@pytest.mark.parametrize("calibration", CALIBRATIONS)
@pytest.mark.parametrize("pca", HEADS)
def test_generate_matches_naive_recompute(tiny, pca, calibration, static):
    model, ids = tiny
    head = tiny_head(model, rank=8) if pca else None
    out, (seq, latents, _) = run_case(model, ids, head, calibration, static)
    assert_same_generation(out, seq, latents)
    # the script ran as planned: row 1 two spans, row 0 one, row 2 none
    assert [len(z) for z in out.latents] == [K, 2 * K, 0]
    new = out.sequences[:, -STEPS:]
    assert new[1, 1:1 + K].tolist() == [ids.latent_pad] * K and new[1, 1 + K] == ids.latent_end
    if calibration != "none":  # calibrated latents carry the target norm
        tau, _ = reference_tau(model, tiny_prompts(ids, ROWS, seed=1), ids, calibration)
        norms = out.latents[1].double().norm(dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, tau[1]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("static", CACHES)
def test_prompt_ending_with_start_token_starts_in_latent_mode(tiny, static):
    model, ids = tiny
    rows = [(3, (56, 56), True), (5, None), (2, None, True)]
    out, (seq, latents, _) = run_case(model, ids, tiny_head(model), "rms", static, rows=rows, sched={}, steps=6)
    assert_same_generation(out, seq, latents)
    new = out.sequences[:, -6:]
    for b in (0, 2):
        assert new[b, :K].tolist() == [ids.latent_pad] * K and new[b, K] == ids.latent_end
    assert ids.latent_pad not in new[1].tolist()


@pytest.mark.parametrize("static", CACHES)
def test_eager_attention_takes_the_additive_mask(static):
    model, ids = tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    out, (seq, latents, _) = run_case(model, ids, tiny_head(model), "ema", static)
    assert_same_generation(out, seq, latents)


def test_lm_head_and_host_reads_only_on_text_steps(tiny, monkeypatch):
    model, ids = tiny
    calls = {"lm_head": 0, "reads": 0}
    hook = model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    to_host = G._to_host

    def counting(t):
        calls["reads"] += 1
        return to_host(t)

    monkeypatch.setattr(G, "_to_host", counting)
    try:
        out, (seq, latents, text_steps) = run_case(model, ids, None, "none")
    finally:
        hook.remove()
    assert_same_generation(out, seq, latents)
    naive_calls = len(text_steps)  # the naive loop runs the LM head at every step
    assert not all(text_steps), "the script must contain steps without a live text row"
    assert calls["lm_head"] - naive_calls == sum(text_steps)
    assert calls["reads"] == sum(text_steps) + 2  # + the prompt's last tokens and the EOS ids, at prefill


def test_rms_without_images_or_ema_leaves_latents_uncalibrated(tiny):
    model, ids = tiny
    rows = [(3, None), (4, None)]
    sched = {(0, 0): ids.latent_start, (1, 1): ids.latent_start}
    uncal, _ = run_case(model, ids, None, "none", rows=rows, sched=sched, steps=6)
    rms, _ = run_case(model, ids, None, "rms", rows=rows, sched=sched, steps=6)
    assert torch.equal(uncal.sequences, rms.sequences)
    for a, b in zip(uncal.latents, rms.latents):
        assert torch.equal(a, b)


@pytest.mark.parametrize("static", CACHES)
@pytest.mark.parametrize("sample", [pytest.param(False, id="greedy"), pytest.param(True, id="sample")])
def test_text_only_matches_hugging_face_generate(tiny, sample, static):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=2)
    kw = dict(max_new_tokens=12, do_sample=sample, suppress_tokens=[ids.latent_start])
    if sample:
        kw.update(temperature=0.8, top_k=20, top_p=0.9)
    ref, out = hf_and_patched(model, ids, batch, static, **kw)
    assert torch.equal(out, ref), f"\n{out}\n{ref}"


def test_static_cache_matches_dynamic_and_is_reused(tiny):
    model, ids = tiny
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=3, calibration="ema"))
    try:
        for seed, rows in ((3, ROWS), (4, [(5, (56, 56)), (1, (84, 56)), (2, None)])):
            batch = tiny_prompts(ids, rows, seed=seed)
            sched = {(0, 2): ids.latent_start, (2, 0): ids.latent_start, (2, 6): ids.latent_start}
            kw = dict(max_new_tokens=12, do_sample=True, top_k=8, return_dict_in_generate=True,
                      logits_processor=forcing(batch, ids, sched))
            ema = model.gap.tau_ema.clone()
            torch.manual_seed(seed)
            dynamic = model.generate(**batch, **kw)
            model.gap.tau_ema.copy_(ema)
            torch.manual_seed(seed)
            static = model.generate(**batch, static_cache=True, **kw)
            decoder = model.gap.decoder
            assert torch.equal(static.sequences, dynamic.sequences)
            for a, b in zip(static.latents, dynamic.latents):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert decoder is model.gap.decoder  # the static cache (and on a GPU the graph) is kept
    finally:
        gapkern.unpatch(model)


def test_graph_warm_up_leaves_no_trace(tiny, monkeypatch):
    """The graph path's warm-up runs the step twice after prefill and undoes it (CPU stand-in for capture)."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    kw = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              logits_processor=forcing(batch, ids, schedule(ids)))
    dynamic, warmed = dynamic_and_warmed_up(model, tiny_head(model), ids.gap_config(latent_budget=K, calibration="rms"),
                                            batch, monkeypatch, **kw)
    assert torch.equal(warmed.sequences, dynamic.sequences)
    for a, b in zip(warmed.latents, dynamic.latents):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unsupported_options_fail_clearly(tiny):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS[:1])
    gapkern.patch(model, None, ids.gap_config())
    try:
        with pytest.raises(NotImplementedError, match="num_beams"):
            model.generate(**batch, max_new_tokens=2, num_beams=2)
        with pytest.raises(ValueError, match="custom_generate"):
            model.generate(**batch, max_new_tokens=2, custom_generate=lambda *a, **k: None)
        with pytest.raises(ValueError, match="cuda_graph"):  # the tiny model is on the CPU
            model.generate(**batch, max_new_tokens=2, cuda_graph=True)
    finally:
        gapkern.unpatch(model)


def gpu_case(dtype=torch.float32):
    model, ids = tiny_qwen2_5_vl(seed=0, dtype=dtype)
    model = model.cuda()
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K, calibration="rms"))
    batch = tiny_prompts(ids, ROWS, seed=1, device="cuda")
    kw = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              logits_processor=forcing(batch, ids, schedule(ids)))
    return model, batch, kw


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_matches_static_eager_on_gpu(dtype):
    model, batch, kw = gpu_case(dtype)
    eager = model.generate(**batch, cuda_graph=False, static_cache=True, **kw)
    graphed = model.generate(**batch, cuda_graph=True, **kw)
    decoder = model.gap.decoder
    assert decoder.graph is not None
    again = model.generate(**batch, **kw)  # the default on CUDA: the graph, kept and replayed again
    assert model.gap.decoder is decoder
    for out in (graphed, again):
        assert torch.equal(out.sequences, eager.sequences)
        for a, b in zip(out.latents, eager.latents):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:  # and the static cache agrees with the dynamic one
        dynamic = model.generate(**batch, cuda_graph=False, **kw)
        assert torch.equal(dynamic.sequences, eager.sequences)
    gapkern.unpatch(model)


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [True, False])
def test_decode_step_never_syncs_on_gpu(graph, monkeypatch):
    """Inside a step (graph replay, or the eager step with its latent write) nothing waits for the GPU."""
    model, batch, kw = gpu_case()
    step = G.Decoder.step

    def strict(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(G.Decoder, "step", strict)
    out = model.generate(**batch, cuda_graph=graph, **kw)
    assert [len(z) for z in out.latents] == [K, 2 * K, 0]
    gapkern.unpatch(model)


def test_kept_static_decoder_follows_set_attn_implementation():
    """The kept static decoder prebuilds its attention mask for one kernel: after
    ``set_attn_implementation`` it must not be reused (a boolean sdpa mask fed to eager attention)."""
    model, ids = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    batch = tiny_prompts(ids, ROWS, seed=1)
    cfg = ids.gap_config(latent_budget=K)
    procs = forcing(batch, ids, schedule(ids))
    gapkern.patch(model, tiny_head(model), cfg)
    try:
        for kind in ("sdpa", "eager", "sdpa"):
            model.set_attn_implementation(kind)
            seq, latents, _ = naive_generate(model, batch, cfg, model.gap.head, None, STEPS, procs)
            out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, logits_processor=procs,
                                 return_dict_in_generate=True, static_cache=True)
            assert_same_generation(out, seq, latents)
            assert model.gap.decoder.attention == kind
    finally:
        gapkern.unpatch(model)
