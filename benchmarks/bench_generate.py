"""Decode benchmarks: one latent step vs one text step, and the patched generate vs the naive
recomputing loop vs Hugging Face's own generate (unpatched), at B=1.

CPU: the tiny random Qwen2.5-VL in float32 (one thread), so the suite runs anywhere.
GPU: a Qwen2.5-VL-7B-shaped language model with random bfloat16 weights (hidden 3584, 28
layers, 28 heads, 4 kv heads, intermediate 18944, vocab 152064), built on the device, with a
small vision tower: a decode step never runs the tower, it only sets the prompt's visual
embeddings. The patched generate replays a CUDA graph per step there.

The ratios (latent step / text step, goal <= 0.95 on a GPU; the patched generate x HF and x naive)
are computed from the JSON afterwards, per benchmark group: ``python -m benchmarks.report RESULTS.json``.

Run: pytest benchmarks/bench_generate.py --benchmark-only [--benchmark-json=benchmarks/results/NAME.json]
"""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

import gapkern
from gapkern.models.qwen2_5_vl import generate as G
from gapkern.testing import ForceTokens, tiny_head, tiny_prompts, tiny_qwen2_5_vl
from gapkern.testing import naive_generate

from conftest import ON_GPU

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPE_7B = dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
                vocab_size=152064)
RANK = 629 if ON_GPU else 8  # PCA rank keeping ~95% of variance at 7B
K = 8  # latents per span
NEW = 32  # new positions per generate call: two spans (18 latent-only steps), 14 text steps
PROMPT = [(16, (224, 224))]  # 16 text tokens and a 224x224 image (64 visual tokens)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def setup():
    if ON_GPU:
        model, ids = tiny_qwen2_5_vl(seed=0, dtype=DTYPE, device=DEVICE, init_std=0.02, **SHAPE_7B)
        info = {"model": "Qwen2.5-VL-7B-shaped language model, random weights; vision tower: 1 block, "
                         "hidden 32 (a decode step does not run it)"}
    else:
        model, ids = tiny_qwen2_5_vl(seed=0, dtype=DTYPE)
        info = {"model": "tiny Qwen2.5-VL, random weights"}
    text = model.config.text_config
    info.update(D=text.hidden_size, layers=text.num_hidden_layers, vocab=text.vocab_size, d=RANK, K=K, B=1,
                dtype=str(DTYPE), device=DEVICE, attention=text._attn_implementation)
    head = tiny_head(model, rank=RANK)
    batch = tiny_prompts(ids, PROMPT, seed=0, device=DEVICE)
    batch["pixel_values"] = batch["pixel_values"].to(DTYPE)
    return model, ids, head, batch, info


def weight_bytes(model, head, text: bool) -> int:
    """What one decode step reads: the decoder layers, plus the LM head (text) or the PCA head (latent)."""
    def size(params):
        return sum(p.numel() * p.element_size() for p in params)
    lm = model.model.language_model
    return size(lm.layers.parameters()) + size([model.lm_head.weight] if text else [head.weight, head.basis])


# ---- one step --------------------------------------------------------------------------------------------------


class Steps:
    """A decoder after prefill, as ``decode`` drives it (static cache; on a GPU one replayed CUDA graph),
    stepping its row in text mode (LM head, sampling, the host read) or in latent mode."""

    def __init__(self, model, ids, batch, latent: bool):
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, length = input_ids.shape
        self.model, self.dec = model, G._decoder(model, rows, length + 2 * G.STATIC_BUCKET, True, ON_GPU)
        pos, _ = model.model.get_rope_index(input_ids, batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
        self.dec.start(input_ids[:, -1], mask, pos, ids.pad, torch.zeros(0, dtype=torch.long, device=DEVICE))
        hidden, norms, image_mask = G.prefill(model, self.dec.cache, input_ids, mask, pos, batch["pixel_values"],
                                              batch["image_grid_thw"])
        self.dec.tau.copy_(model.gap.calibration_tau(norms, image_mask, rows))
        if ON_GPU and self.dec.graph is None:
            self.dec.graph = G.step_graph.capture(self.dec)
        if latent:  # a span that never ends
            self.dec.left.fill_(2 ** 40)
        self.dec.advance(hidden)
        self.hidden, self.seq = hidden, input_ids
        self.procs = LogitsProcessorList([ForceTokens(length, {}, banned=[ids.latent_start])])  # stay in text
        self.saved = [t.clone() for t in self.dec.step_state()]
        self.room, self.n = self.dec.max_len - length - 1, 0

    def _tick(self):
        """Rewind to just after prefill before the static cache runs out (once every ~250 steps)."""
        self.n += 1
        if self.n == self.room:
            for t, s in zip(self.dec.step_state(), self.saved):
                t.copy_(s)
            self.n = 1

    def text(self):
        self._tick()
        self.dec.commit(G.sample(self.model, self.hidden, self.seq, self.procs, False))
        G._to_host(self.dec.tokens)
        self.hidden = self.dec.step(self.dec.max_len)

    def latent(self):
        self._tick()
        self.hidden = self.dec.step(self.dec.max_len)


@pytest.mark.parametrize("mode", ["text", "latent"])
def test_decode_step(measure, benchmark, setup, mode):
    model, ids, head, batch, info = setup
    benchmark.group = f"decode step D{info['D']} B1"
    gapkern.patch(model, head, ids.gap_config(latent_budget=K, calibration="rms"))
    try:
        steps = Steps(model, ids, batch, latent=mode == "latent")
        fn = steps.latent if mode == "latent" else steps.text
        measure(fn, weight_bytes(model, head, mode == "text"), op="decode_step", mode=mode, cuda_graph=ON_GPU,
                **info)
    finally:
        gapkern.unpatch(model)


# ---- whole generate calls --------------------------------------------------------------------------------------


def script(batch, ids):
    """Spans forced at new positions 2 and 16; EOS banned, so every call writes NEW positions."""
    sched = {(0, 2): ids.latent_start, (0, 16): ids.latent_start}
    return LogitsProcessorList([ForceTokens(batch["input_ids"].shape[1], sched, banned=[ids.latent_start, ids.eos])])


@pytest.mark.parametrize("impl", ["naive", "hf", "patched"])
def test_generate(measure, benchmark, setup, impl):
    model, ids, head, batch, info = setup
    benchmark.group = f"generate D{info['D']} B1 {NEW} new positions"
    cfg = ids.gap_config(latent_budget=K, calibration="rms")
    procs = script(batch, ids)
    kw = dict(max_new_tokens=NEW, do_sample=False, logits_processor=procs)
    if impl == "naive":  # recomputes the whole sequence each step; latents in float64, rms target per row
        with torch.no_grad():
            image = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            feats = torch.cat(image.pooler_output)
        tau = [feats.float().norm(dim=-1).mean().item()]
        fn = lambda: naive_generate(model, batch, cfg, head, tau, NEW, procs)  # noqa: E731
    elif impl == "hf":  # the unpatched model: no latents, the start token is just a token
        fn = lambda: model.generate(**batch, **kw)  # noqa: E731
    else:
        gapkern.patch(model, head, cfg)
        fn = lambda: model.generate(**batch, **kw)  # noqa: E731
    try:
        bytes_moved = NEW * weight_bytes(model, head, text=True)  # the weights, once per new position
        measure(fn, bytes_moved, inner=1, op="generate", impl=impl, new=NEW, **info)
    finally:
        gapkern.unpatch(model)
