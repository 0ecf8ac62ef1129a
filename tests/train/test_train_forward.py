"""The teacher-forced training forward (SPEC 4.5) against a plain PyTorch computation written here."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2_5_VLForConditionalGeneration

from gapkern.models import GapQwen2_5_VLForConditionalGeneration
from gapkern.testing import tiny_head, tiny_qwen2_5_vl
from gapkern.train import GapCausalLMOutput, gap_forward, latent_loss

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
IMAGE = (56, 56)  # 4 x 4 patches -> 4 merged visual tokens


@pytest.fixture(scope="module")
def tiny():
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    return model, ids


def _batch(ids, seed=0):
    """Two right-padded rows: row 0 with an image and two latent spans, row 1 text only with one span.

    Labels: the response part only, and deliberately NOT -100 at the latent slots (the forward must drop them).
    """
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return (ids.first_text + torch.randint(ids.vocab_size - ids.first_text, (n,), generator=g)).tolist()

    span = [ids.latent_start] + [ids.latent_pad] * K + [ids.latent_end]
    n_visual = (IMAGE[0] // 28) * (IMAGE[1] // 28)
    row0 = text(1) + [ids.vision_start] + [ids.image_pad] * n_visual + [ids.vision_end] + text(3)
    prompt0 = len(row0)
    row0 += text(2) + span + text(2) + span + text(1) + [ids.eos]
    row1 = text(4)
    prompt1 = len(row1)
    row1 += text(1) + span + text(2) + [ids.eos]
    width = max(len(row0), len(row1))
    input_ids = torch.full((2, width), ids.pad)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100)
    for b, (row, prompt) in enumerate(((row0, prompt0), (row1, prompt1))):
        input_ids[b, :len(row)] = torch.tensor(row)
        attention_mask[b, :len(row)] = 1
        labels[b, prompt:len(row)] = torch.tensor(row[prompt:])
    h, w = IMAGE[0] // 14, IMAGE[1] // 14
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "mm_token_type_ids": (input_ids == ids.image_pad).long(),
        "pixel_values": torch.randn(h * w, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, h, w]]),
    }


def _targets(model, batch, ids, seed=1):
    slots = int((batch["input_ids"] == ids.latent_pad).sum())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(slots, model.config.text_config.hidden_size, generator=g)


def _reference(model, batch, targets, ids, head, weight=1.0):
    """Embeddings with the targets at the slots, the base class's forward (its own image scatter and M-RoPE),
    the final norm's output by a hook, then cross-entropy and the coefficient MSE written out here."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    slots = input_ids == ids.latent_pad
    embeds = model.get_input_embeddings()(input_ids).clone()
    embeds[slots] = targets  # boolean indexing is row-major: batch, then position
    captured = {}
    hook = model.model.language_model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("hidden", o))
    try:
        out = Qwen2_5_VLForConditionalGeneration.forward(
            model, input_ids=input_ids, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"])
    finally:
        hook.remove()
    hidden, logits = captured["hidden"], out.logits
    text_labels = labels.masked_fill(slots, -100)
    vocab = logits.shape[-1]
    text = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), text_labels[:, 1:].reshape(-1), ignore_index=-100)
    preds, goals = [], []
    for b, p in slots.nonzero().tolist():
        h = hidden[b, p - 1]
        if head is None:
            preds.append(h)
        else:
            preds.append(h @ head.weight + head.bias)
        goals.append(targets[len(goals)])
    preds, goals = torch.stack(preds), torch.stack(goals)
    if head is not None:
        goals = (goals - head.mean) @ head.basis
        if head.sigma is not None:
            goals = goals / head.sigma
    latent = ((preds - goals) ** 2).mean()
    return text + weight * latent, text, latent, logits


@pytest.mark.parametrize("head_kind", ["whitened", "plain", "none"])
def test_losses_match_plain_pytorch(tiny, head_kind):
    model, ids = tiny
    head = None if head_kind == "none" else tiny_head(model, rank=8, whitened=head_kind == "whitened")
    model.set_gap(head, ids.gap_config(latent_budget=K))
    batch = _batch(ids)
    targets = _targets(model, batch, ids)
    out = model(**batch, latent_targets=targets, latent_loss_weight=0.7)
    with torch.no_grad():
        loss, text, latent, logits = _reference(model, batch, targets, ids, model.gap.head, weight=0.7)
    assert int((batch["input_ids"] == ids.latent_pad).sum()) == 3 * K
    for got, want in ((out.loss, loss), (out.text_loss, text), (out.latent_loss, latent), (out.logits, logits)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert out.latent_loss > 0 and out.text_loss > 0


def test_gradients_reach_head_and_lm(tiny):
    model, ids = tiny
    model.set_gap(tiny_head(model, rank=8), ids.gap_config(latent_budget=K))
    model.zero_grad(set_to_none=True)
    batch = _batch(ids)
    # what generate-style callers pass is dropped: training keeps no cache and returns an output object
    out = model(**batch, latent_targets=_targets(model, batch, ids), use_cache=True, return_dict=False)
    assert isinstance(out, GapCausalLMOutput)
    out.loss.backward()
    lm = model.model.language_model
    for name, param in (("head.weight", model.gap.head.weight), ("head.bias", model.gap.head.bias),
                        ("q_proj", lm.layers[0].self_attn.q_proj.weight), ("norm", lm.norm.weight),
                        ("lm_head", model.lm_head.weight), ("merger", model.model.visual.merger.mlp[0].weight)):
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def test_latent_loss_gradient_flows_through_the_head_op(tiny):
    """Only the latent part: the head's gradient is the analytic one of the MSE (pca_project's fused backward)."""
    model, ids = tiny
    head = tiny_head(model, rank=8, whitened=False)
    hidden = torch.randn(1, 6, model.config.text_config.hidden_size, requires_grad=True)
    slots = torch.tensor([[False, False, True, True, False, False]])
    targets = torch.randn(2, hidden.shape[-1])
    loss = latent_loss(hidden, slots, targets, head)
    loss.backward()
    h = hidden.detach()[0, [1, 2]]
    residual = h @ head.weight.detach() + head.bias.detach() - (targets - head.mean) @ head.basis
    scale = 2 / residual.numel()
    torch.testing.assert_close(head.weight.grad, scale * h.T @ residual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.bias.grad, scale * residual.sum(0), rtol=1e-5, atol=1e-6)
    expected = torch.zeros_like(hidden)
    expected[0, [1, 2]] = scale * residual @ head.weight.detach().T
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)


def test_slot_j_is_predicted_from_the_position_before_it(tiny):
    """hidden[p_j - 1] holds exactly the state whose projection is c_j: loss 0; the same at p_j: not 0."""
    model, ids = tiny
    head = tiny_head(model, rank=8, whitened=True)
    dim = head.hidden_size
    slots = torch.zeros(2, 7, dtype=torch.bool)
    slots[0, [2, 3]] = True
    slots[1, 5] = True
    targets = torch.randn(3, dim)
    coeffs = head.target_coeffs(targets)
    # the hidden state that the head maps to coeffs: weight (D, d) has full column rank
    states = torch.linalg.lstsq(head.weight.detach().T, (coeffs - head.bias.detach()).T).solution.T
    before, at = torch.randn(2, 7, dim), torch.randn(2, 7, dim)
    for j, (b, p) in enumerate(slots.nonzero().tolist()):
        before[b, p - 1] = states[j]
    for j, (b, p) in enumerate(slots.nonzero().tolist()):
        at[b, p] = states[j]
    with torch.no_grad():
        assert latent_loss(before, slots, targets, head) < 1e-8
        assert latent_loss(at, slots, targets, head) > 1e-2


def test_no_slot_batch_has_zero_latent_loss_in_the_graph(tiny):
    model, ids = tiny
    model.set_gap(tiny_head(model, rank=8), ids.gap_config(latent_budget=K))
    model.zero_grad(set_to_none=True)
    batch = _batch(ids)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == ids.latent_pad, ids.first_text)
    dim = model.config.text_config.hidden_size
    out = model(**batch, latent_targets=torch.zeros(0, dim))
    plain = model(**batch)  # the base forward: its loss is the text loss
    assert out.latent_loss.item() == 0.0 and out.latent_loss.requires_grad
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.text_loss, plain.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    assert model.gap.head.weight.grad is not None and model.gap.head.weight.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)


def test_batches_with_and_without_slots_accumulate_gradients_in_the_same_order(tiny):
    """DeepSpeed ZeRO-2 fills its reduce bucket in the order the gradients accumulate and reduces it
    elementwise across ranks (deepspeed/runtime/zero/stage_1_and_2.py, 0.19.8,
    ``reduce_independent_p_g_buckets_and_remove_grads`` line 1414, ``average_tensor`` line 1590): a rank
    whose batch has no latent slot must reach the head's weight and bias in the same order as one whose
    batch has, or ZeRO-2 averages one's weight gradient with the other's bias gradient
    (scripts/zero2_hook_order_repro.py shows it without gapkern). The order was bias, weight without slots."""
    model, ids = tiny
    model.set_gap(tiny_head(model, rank=8), ids.gap_config(latent_budget=K))
    order = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
             for name, p in model.named_parameters() if p.requires_grad]
    seen = []
    try:
        for with_slots in (True, False):
            batch = _batch(ids)
            if not with_slots:
                batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == ids.latent_pad,
                                                                    ids.first_text)
            targets = _targets(model, batch, ids)
            model.zero_grad(set_to_none=True)
            order.clear()
            model(**batch, latent_targets=targets).loss.backward()
            seen.append(list(order))
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
    assert seen[0][:2] == ["gap.head.weight", "gap.head.bias"]
    assert seen[0] == seen[1]


def test_forward_without_latent_arguments_is_the_base_forward(tiny):
    model, ids = tiny
    model.set_gap(tiny_head(model, rank=8), ids.gap_config(latent_budget=K))
    base, _ = tiny_qwen2_5_vl(seed=1)
    missing, unexpected = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("gap.") for k in unexpected)
    batch = _batch(ids)
    with torch.no_grad():
        ours, theirs = model(**batch), base(**batch)
    assert type(ours) is type(theirs)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    params = inspect.signature(GapQwen2_5_VLForConditionalGeneration.forward).parameters
    assert {"labels", "logits_to_keep", "latent_targets", "latent_loss_weight"} <= set(params)


def test_gap_forward_without_latent_targets_reads_as_no_rows(tiny):
    model, ids = tiny
    model.set_gap(None, ids.gap_config(latent_budget=K))
    batch = _batch(ids)
    with pytest.raises(ValueError, match=r"latent_targets: expected one row per latent slot .*\(9 slots"):
        gap_forward(model, **batch)


@pytest.mark.parametrize("case, message", [
    ("rows", r"latent_targets: expected one row per latent slot of input_ids \(9 slots"),
    ("width", r"latent_targets: expected width D=64"),
    ("kind", r"latent_targets: expected a float tensor \(S, D\)"),
    ("first", r"input_ids: a latent slot at position 0"),
    ("labels", r"labels: expected shape"),
    ("weight", r"latent_loss_weight: expected a number"),
    ("positional", r"pass input_ids and the other inputs by keyword"),
])
def test_bad_inputs_name_the_argument(tiny, case, message):
    model, ids = tiny
    model.set_gap(None, ids.gap_config(latent_budget=K))
    batch = _batch(ids)
    targets = _targets(model, batch, ids)
    kw = {"latent_targets": targets}
    if case == "rows":
        kw["latent_targets"] = targets[:-1]
    elif case == "width":
        kw["latent_targets"] = targets[:, :10]
    elif case == "kind":
        kw["latent_targets"] = targets.long()
    elif case == "first":
        batch["input_ids"] = batch["input_ids"].clone()
        batch["input_ids"][1, 0] = ids.latent_pad
        kw["latent_targets"] = torch.cat([targets, targets[:1]])
    elif case == "labels":
        batch["labels"] = batch["labels"][:, :-1]
    elif case == "weight":
        kw["latent_loss_weight"] = "1"
    exc = TypeError if case in ("weight", "positional") else ValueError
    with pytest.raises(exc, match=message):
        if case == "positional":
            model(batch.pop("input_ids"), **batch, **kw)
        else:
            model(**batch, **kw)


def test_model_without_gap_state_is_refused():
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    batch = _batch(ids)
    with pytest.raises(ValueError, match=r"model: no GapConfig attached; call model.set_gap"):
        model(**batch, latent_targets=torch.zeros(9, 64))


@pytest.mark.parametrize("padding", ["none", "right", "left", "no mask"])
def test_text_positions_are_get_rope_index_on_a_batch_without_vision(tiny, padding):
    """The forward's vectorized positions for a batch with no image or video equal transformers' own
    ``get_rope_index`` (transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py, ``Qwen2_5_VLModel.get_rope_index``,
    line 955 in 5.17, 934 in 5.25: the per-row loop that gives a text run ``arange`` over the attended tokens and
    leaves padding at 0), token for token, for right, left and no padding; and the forward's logits are those of
    the explicit ``get_rope_index`` positions."""
    from gapkern.train.forward import text_positions

    model, ids = tiny
    model.set_gap(tiny_head(model, rank=8), ids.gap_config(latent_budget=K))
    g = torch.Generator().manual_seed(3)
    input_ids = ids.first_text + torch.randint(ids.vocab_size - ids.first_text, (3, 12), generator=g)
    mask = torch.ones_like(input_ids)
    if padding == "right":
        mask[0, 9:], mask[2, 5:] = 0, 0
    elif padding == "left":
        mask[0, :3], mask[1, :7] = 0, 0
    types = torch.zeros_like(input_ids)
    attention = None if padding == "no mask" else mask
    expected, _ = model.model.get_rope_index(input_ids, types, attention_mask=attention)
    got = text_positions(input_ids, attention)
    assert got.shape == expected.shape and got.dtype == expected.dtype and torch.equal(got, expected)
    with torch.no_grad():
        ours = gap_forward(model, input_ids, attention_mask=attention)
        explicit = gap_forward(model, input_ids, attention_mask=attention, position_ids=expected)
    assert torch.equal(ours.logits, explicit.logits)
