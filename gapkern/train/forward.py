"""The teacher-forced training forward of a Gap Qwen2.5-VL (SPEC 4.5), in one pass.

The input at latent slot ``j`` (a ``latent_pad_id`` position) is the target
``t_j``; the final-normed hidden state at the position before the slot goes
through the head (its forward, ``gapkern.ops.pca_project`` with its fused backward), the
same position rule as ``generate``. ``loss = text_loss + latent_loss_weight *
latent_loss``; ``text_loss`` is the model's own causal-LM cross-entropy with
the slots' labels set to -100.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.qwen2_5_vl import hf_compat as hf

__all__ = ["GapCausalLMOutput", "gap_forward", "latent_loss"]

IGNORE = -100  # Hugging Face's ignore_index


@dataclass
class GapCausalLMOutput(CausalLMOutputWithPast):
    """``loss``, ``logits`` (and ``hidden_states`` / ``attentions`` when asked), plus the two parts of the loss.

    ``text_loss`` is None without ``labels``; ``latent_loss`` is 0 (a tensor
    in the graph) for a batch without latent slots.
    """

    text_loss: torch.Tensor | None = None
    latent_loss: torch.Tensor | None = None


def gap_forward(model, input_ids=None, *, attention_mask=None, labels=None, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, position_ids=None, latent_targets=None, latent_loss_weight=1.0,
                **kwargs) -> GapCausalLMOutput:
    """Teacher forcing through ``model`` (a Gap Qwen2.5-VL with ``set_gap`` done): see the module docstring.

    ``latent_targets (S, D)``: one row per latent slot of the batch, batch-major
    then in position order (None is the same as no rows). Other keyword
    arguments go to the inner ``Qwen2_5_VLModel`` (e.g. ``output_hidden_states``).
    """
    for name in ("use_cache", "return_dict", "logits_to_keep"):  # training: no cache, every logit, an output object
        kwargs.pop(name, None)
    state = model._modules.get("gap")
    if state is None:
        raise ValueError("model: no GapConfig attached; call model.set_gap(head, config) before training")
    _check_ids("input_ids", input_ids)
    if labels is not None:
        _check_ids("labels", labels, like=input_ids)
    if isinstance(latent_loss_weight, bool) or not isinstance(latent_loss_weight, numbers.Real):
        raise TypeError(f"latent_loss_weight: expected a number, got {latent_loss_weight!r}")
    slots = input_ids == state.config.latent_pad_id
    embeds = model.get_input_embeddings()(input_ids)
    targets, positions = _check_targets(latent_targets, slots, embeds)
    if targets.shape[0]:
        # masked_scatter fills the slots in row-major (batch, position) order: the order of latent_targets
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), targets.to(embeds.dtype))
    if mm_token_type_ids is None:  # the processor's: 1 at image tokens, 2 at video tokens (latent slots are text)
        mm_token_type_ids = (input_ids == model.config.image_token_id).long()
        mm_token_type_ids[input_ids == model.config.video_token_id] = 2
    if position_ids is None:  # M-RoPE over the whole sequence, padding-aware
        if image_grid_thw is None and kwargs.get("video_grid_thw") is None:
            position_ids = text_positions(input_ids, attention_mask)  # no vision input: get_rope_index's result, vectorized
        else:
            position_ids, _ = hf.rope_index(
                model, input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask,
                video_grid_thw=kwargs.get("video_grid_thw"), second_per_grid_ts=kwargs.get("second_per_grid_ts"))
    # input_ids beside inputs_embeds: the model scatters the image features at the image tokens it finds there
    outputs = model.model(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                          position_ids=position_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                          mm_token_type_ids=mm_token_type_ids, use_cache=False, **kwargs)
    hidden = outputs.last_hidden_state
    logits = model.lm_head(hidden)
    text_loss = None
    if labels is not None:
        text_labels = labels.masked_fill(slots.to(labels.device), IGNORE)  # slots never count as text
        text_loss = model.loss_function(logits=logits, labels=text_labels,
                                        vocab_size=model.config.text_config.vocab_size)
    lat_loss = latent_loss(hidden, slots, targets, state.head, positions=positions)
    loss = lat_loss * latent_loss_weight if text_loss is None else text_loss + latent_loss_weight * lat_loss
    return GapCausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                             attentions=outputs.attentions, text_loss=text_loss, latent_loss=lat_loss)


def text_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The M-RoPE positions (3, B, L) of a batch with no image or video: what Qwen2.5-VL's ``get_rope_index`` gives
    it (every axis counts the row's attended tokens from 0; padding gets 0), in three tensor ops instead of its
    per-row Python loop (issue 20 item 7: ~10 ms a step at D = 64). Pinned to ``get_rope_index`` by
    tests/train/test_train_forward.py."""
    rows, length = input_ids.shape
    if attention_mask is None:
        positions = torch.arange(length, device=input_ids.device).expand(rows, -1)
    else:
        mask = attention_mask.bool()
        positions = (mask.long().cumsum(-1) - 1).masked_fill_(~mask, 0)
    return positions.to(input_ids.dtype).unsqueeze(0).expand(3, -1, -1)


def latent_loss(hidden: torch.Tensor, slots: torch.Tensor, targets: torch.Tensor, head=None, *,
                positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over slots and coefficients of ``(head(hidden before the slot) - head.target_coeffs(target))**2``.

    ``hidden (B, L, D)`` final-normed, ``slots (B, L)`` bool, ``targets (S, D)``.
    Without a head (output-as-input) the hidden state itself is compared with
    the target, a mean over D. Computed in float32. No slot: an exact 0 with zero gradients that still
    reaches the hidden state and the head through the same ops as a batch with slots (DDP sees every
    parameter used; DeepSpeed ZeRO-2 sees the head's gradients in the same order on every rank). ``positions``:
    ``slots.nonzero(as_tuple=True)`` when the caller has it (found here otherwise: it waits for the device).
    """
    rows, cols = slots.nonzero(as_tuple=True) if positions is None else positions  # row-major: targets' order
    if rows.numel() == 0:
        if head is None:
            return hidden[:, :0].float().sum()
        # the same graph as with slots (DeepSpeed ZeRO-2 needs every rank to reach the head's weight and bias
        # in the same order, scripts/zero2_hook_order_repro.py): the first state, against its own coefficients
        rows = cols = torch.zeros(1, dtype=torch.long, device=hidden.device)
        coeffs = head(hidden[rows, cols].to(head.weight.dtype))
        return (coeffs.float() - coeffs.detach().float()).pow(2).mean()
    before = hidden[rows, cols - 1]  # the state that generate turns into latent j
    if head is None:
        return (before.float() - targets.float()).pow(2).mean()
    coeffs = head(before.to(head.weight.dtype))  # its forward: FSDP gathers a head that is its own unit
    return (coeffs.float() - head.target_coeffs(targets)).pow(2).mean()


def _check_ids(name: str, ids, like=None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"{name}: expected an integer tensor (B, L), got {getattr(ids, 'shape', type(ids).__name__)}")
    if like is not None and ids.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} like input_ids, got {tuple(ids.shape)}")


def _check_targets(targets, slots: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``(targets (S, D), slots.nonzero(as_tuple=True))`` for the S slots; None reads as no rows. A slot at
    position 0 has no state before it. The slots are found once, before the forward: :func:`latent_loss`
    reuses them rather than wait for the device after it."""
    positions = slots.nonzero(as_tuple=True)
    count, dim = positions[0].numel(), embeds.shape[-1]
    if targets is None:
        targets = embeds.new_zeros(0, dim)
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or not targets.is_floating_point():
        raise ValueError(f"latent_targets: expected a float tensor (S, D) with D={dim}, "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    if targets.shape[1] != dim:
        raise ValueError(f"latent_targets: expected width D={dim} (the model's hidden size), "
                         f"got shape {tuple(targets.shape)}")
    if targets.shape[0] != count:
        raise ValueError(f"latent_targets: expected one row per latent slot of input_ids ({count} slots, "
                         f"batch-major then position order), got {targets.shape[0]} rows")
    if count and bool((positions[1] == 0).any()):
        raise ValueError("input_ids: a latent slot at position 0 has no hidden state before it to predict it from")
    return targets.to(embeds.device), positions
