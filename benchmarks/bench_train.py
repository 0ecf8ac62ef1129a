"""Training benchmarks: one teacher-forced training step (forward + backward) of a Gap Qwen2.5-VL, with
the head's projection through gapkern's ``pca_project`` (custom op, fused backward) or the same math in
plain PyTorch (``addmm``); and the head's part alone (the latent loss and its backward), for its share.

CPU: the tiny random Qwen2.5-VL in float32 (one thread), so the suite runs anywhere.
GPU: a 7B-shaped slice in bfloat16: hidden 3584, 2 decoder layers (28 heads, 4 kv heads, intermediate
18944), vocab 152064, PCA rank d=629; rows of text with latent spans (no image: the vision tower is
frozen in GAP training, and the slice's tower is tiny).

Recorded in extra_info: ``tokens_per_s`` (rows x length / step time) on the step. The head's share of
the step (same implementation) is computed from the JSON by ``python -m benchmarks.report``.

Run: pytest benchmarks/bench_train.py --benchmark-only [--benchmark-json=benchmarks/results/NAME.json]
"""
from __future__ import annotations

import pytest
import torch

from gapkern.head import PCALatentHead
from gapkern.models import GapQwen2_5_VLForConditionalGeneration
from gapkern.testing import tiny_head, tiny_qwen2_5_vl
from gapkern.train import forward as train_forward

from conftest import ON_GPU

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SLICE_7B = dict(hidden_size=3584, num_layers=2, num_heads=28, num_kv_heads=4, intermediate_size=18944,
                vocab_size=152064)
RANK = 629 if ON_GPU else 8
ROWS, LENGTH, K, SPANS = (4, 1024, 16, 4) if ON_GPU else (2, 64, 4, 2)  # SPANS latent spans of K per row
IMPLS = ("gapkern", "torch")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def setup():
    shape = SLICE_7B if ON_GPU else {}
    model, ids = tiny_qwen2_5_vl(seed=0, dtype=DTYPE, device=DEVICE, init_std=0.02,
                                 model_class=GapQwen2_5_VLForConditionalGeneration, **shape)
    model.set_gap(tiny_head(model, rank=RANK), ids.gap_config(latent_budget=K))
    model.model.visual.requires_grad_(False)
    model.train()
    text = model.config.text_config
    info = dict(D=text.hidden_size, d=RANK, B=ROWS, K=K, layers=text.num_hidden_layers, vocab=text.vocab_size,
                length=LENGTH, slots=ROWS * SPANS * K, dtype=str(DTYPE), device=DEVICE)
    return model, _batch(ids, text.hidden_size), info


def _batch(ids, dim):
    """ROWS rows of LENGTH tokens: text with SPANS latent spans of K slots each, every token labelled."""
    g = torch.Generator().manual_seed(0)
    input_ids = ids.first_text + torch.randint(ids.vocab_size - ids.first_text, (ROWS, LENGTH), generator=g)
    gap = LENGTH // (SPANS + 1)
    for s in range(SPANS):
        at = (s + 1) * gap - K // 2
        input_ids[:, at - 1], input_ids[:, at:at + K], input_ids[:, at + K] = ids.latent_start, ids.latent_pad, \
            ids.latent_end
    slots = int((input_ids == ids.latent_pad).sum())
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
             "latent_targets": torch.randn(slots, dim, generator=g)}
    return {k: v.to(DEVICE) for k, v in batch.items()}


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """``torch``: the head's projection (what the latent loss calls) as plain ``addmm`` instead of gapkern's op."""
    if request.param == "torch":
        monkeypatch.setattr(PCALatentHead, "forward", lambda self, h: h @ self.weight if self.bias is None
                            else torch.addmm(self.bias, h, self.weight))
    return request.param


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_train_step(measure, benchmark, setup, impl):
    """Forward + backward of one batch (gradients zeroed each time, as an optimizer step would)."""
    model, batch, info = setup
    benchmark.group = "train_step"

    def step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    trainable = [p for p in model.parameters() if p.requires_grad]
    seconds = measure(step, 3 * _bytes(trainable), inner=1, op="train_step", impl=impl, **info)
    benchmark.extra_info["tokens_per_s"] = round(ROWS * LENGTH / seconds, 1)


def test_head(measure, benchmark, setup, impl):
    """The latent loss alone (projection of the states before the slots, MSE, backward) on a captured hidden."""
    model, batch, info = setup
    benchmark.group = "train_head"
    head = model.gap.head
    slots = batch["input_ids"] == model.gap.config.latent_pad_id
    hidden = torch.randn(*batch["input_ids"].shape, info["D"], device=DEVICE, dtype=DTYPE, requires_grad=True)

    def part():
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        train_forward.latent_loss(hidden, slots, batch["latent_targets"], head).backward()

    moved = 3 * _bytes([head.weight]) + 2 * info["slots"] * info["D"] * hidden.element_size()
    measure(part, moved, inner=1, op="train_head", impl=impl, **info)


def test_train_step_hf(measure, benchmark, setup):
    """Hugging Face's own step on the same weights and batch: the unpatched Qwen2.5-VL class, text loss only
    (the latent slots' targets dropped; its forward builds the positions itself). The baseline of issue 20's
    "train step <= 1.1x HF": ratio ``train_step`` gapkern / hf (``python -m benchmarks.report``)."""
    model, batch, info = setup
    benchmark.group = "train_step"
    shape = SLICE_7B if ON_GPU else {}
    hf, _ = tiny_qwen2_5_vl(seed=0, dtype=DTYPE, device=DEVICE, init_std=0.02, **shape)
    missing, _ = hf.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    hf.model.visual.requires_grad_(False)
    hf.train()
    plain = {k: v for k, v in batch.items() if k != "latent_targets"}

    def step():
        hf.zero_grad(set_to_none=True)
        hf(**plain).loss.backward()

    trainable = [p for p in hf.parameters() if p.requires_grad]
    seconds = measure(step, 3 * _bytes(trainable), inner=1, op="train_step", impl="hf", **info)
    benchmark.extra_info["tokens_per_s"] = round(ROWS * LENGTH / seconds, 1)
