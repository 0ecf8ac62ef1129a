"""What the decode loop reads from generate's keywords, and what it refuses rather than answer wrongly.

:func:`take_prompt` turns what Hugging Face hands a custom decoding loop (it
differs between releases: :mod:`.hf_compat`) into one :class:`Prompt`. A
caller's ``past_key_values`` (HF's way of continuing a conversation:
``input_ids`` is the whole conversation, the cache holds all of it but the
last turn's new tokens) is continued in place: prefill reads only the new
tokens, at the positions HF computed from the earlier turns' rope deltas.
What a cache cannot carry (new images, a latent cut off mid-span) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache

from . import hf_compat as hf

# keywords generate hands the loop that it may ignore: HF already folded them into the positions
# (mm_token_type_ids, second_per_grid_ts), the loop reads them from the generation config
# (output_attentions, output_hidden_states), or they change nothing here (HF never forwards labels either)
IGNORED = {"use_cache", "logits_to_keep", "mm_token_type_ids", "second_per_grid_ts", "labels", "tokenizer",
           "assistant_tokenizer", "output_attentions", "output_hidden_states"}
VISUAL = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_encoder_outputs")


@dataclass
class Prompt:
    """What the loop reads from generate's keywords, the same on every transformers release."""

    input_ids: torch.Tensor  # (B, L): the whole conversation; (B, 0) for an inputs_embeds prompt without ids
    attention_mask: torch.Tensor  # (B, P): P = L, or the length of inputs_embeds
    position_ids: torch.Tensor  # (3, B, P): HF's M-RoPE positions, rope deltas included
    visual: dict  # what prefill encodes: pixel_values and grids (5.17), or mm_encoder_outputs (5.24)
    past: object = None  # a caller's DynamicCache holding the first past_len positions, or None
    past_len: int = 0
    embeds: torch.Tensor | None = None  # (B, P, D) inputs_embeds: what prefill feeds instead of input_ids

    @property
    def length(self) -> int:
        """The prompt's positions in the KV cache."""
        return self.attention_mask.shape[1]


def mrope(position_ids):
    """(3, B, L) from the layouts HF hands over: (B, L), (1, B, L) (text + rope delta, a continuation),
    (3, B, L), or (4, B, L) (text positions first, a packing hint this loop does not need)."""
    if position_ids.dim() == 2:
        position_ids = position_ids[None]
    if position_ids.shape[0] == 4:
        return position_ids[1:]
    return position_ids.expand(3, -1, -1)


def _given(value) -> bool:
    return value is not None and not (isinstance(value, dict) and not value)  # 5.24: {} without images


def take_prompt(model, input_ids, model_kwargs) -> Prompt:
    """Pop what the loop reads from generate's keywords; refuse what it would get wrong."""
    embeds = model_kwargs.pop("inputs_embeds", None)
    shape = input_ids.shape if embeds is None else embeds.shape[:2]
    if embeds is not None and input_ids.shape[1] not in (0, shape[1]):
        raise ValueError(f"input_ids: with inputs_embeds {tuple(embeds.shape)}, pass the same positions' ids or "
                         f"none, got {tuple(input_ids.shape)}")
    mask = model_kwargs.pop("attention_mask", None)
    if mask is None:  # 5.24 drops an all-ones mask
        mask = torch.ones(shape, dtype=torch.long, device=input_ids.device)
    if mask.shape != shape:
        raise ValueError(f"attention_mask: expected the shape of the prompt {tuple(shape)}, got {tuple(mask.shape)} "
                         "(with past_key_values, pass the whole conversation as input_ids)")
    position_ids = mrope(model_kwargs.pop("position_ids"))
    past = hf.pop_cache(model_kwargs)
    past_len = 0 if past is None else int(past.get_seq_length())  # HF's own new cache is empty: ours replaces it
    visual = {k: v for k in VISUAL if _given(v := model_kwargs.pop(k, None))}
    unknown = sorted(k for k, v in model_kwargs.items() if v is not None and k not in IGNORED)
    if unknown:
        raise NotImplementedError(
            f"generate: {', '.join(unknown)} reached the decoding loop (passed by the caller or by transformers "
            f"{transformers.__version__}); the latent-aware generate does not handle them")
    prompt = Prompt(input_ids, mask, position_ids, visual, past if past_len else None, past_len, embeds)
    if prompt.past is not None:
        check_continuation(model, prompt)
    return prompt


def last_tokens(model, prompt: Prompt) -> torch.Tensor:
    """(B,) each prompt's last token id, which decides whether the row starts in a span. An inputs_embeds
    prompt without ids ends with the start token when its last embedding is that token's (as HF finds
    image placeholders in inputs_embeds); its other rows get -1."""
    if prompt.input_ids.shape[1]:
        return prompt.input_ids[:, -1]
    start = model.gap.config.latent_start_id
    is_start = (prompt.embeds[:, -1] == model.get_input_embeddings().weight[start]).all(-1)
    return torch.where(is_start, start, -1)


def check_continuation(model, prompt: Prompt) -> None:
    """A conversation continued on its cache: refuse what the cache cannot carry rather than answer wrongly."""
    past, held, length = prompt.past, prompt.past_len, prompt.input_ids.shape[1]
    if prompt.embeds is not None:
        raise ValueError("inputs_embeds: continuing a conversation on past_key_values takes its tokens as input_ids "
                         "(the whole conversation)")
    if not isinstance(past, DynamicCache):
        raise ValueError("past_key_values: continuing a conversation needs the DynamicCache an earlier dynamic-cache "
                         f"generate returned, got {type(past).__name__} (a static generate's cache is rewritten by the "
                         "next static call: generate the turn to continue with a dynamic cache)")
    if length <= held or prompt.position_ids.shape[-1] != length:
        raise ValueError(f"input_ids: past_key_values holds {held} positions, so input_ids must be the whole "
                         f"conversation: those {held} tokens, then at least one new one (got {length} tokens)")
    if prompt.visual:
        raise ValueError("pixel_values / pixel_values_videos: the images of earlier turns are in past_key_values "
                         "already; continue without them (a continuation cannot add images)")
    new, cfg = prompt.input_ids[:, held:], model.config
    if bool(((new == cfg.image_token_id) | (new == cfg.video_token_id)).any()):
        raise ValueError("input_ids: image or video tokens after the part past_key_values holds; a continuation "
                         "cannot add images (start a new conversation with them)")
    if bool((new == model.gap.config.latent_pad_id).any()):
        raise ValueError("input_ids: a latent placeholder (latent_pad_id) after the part past_key_values holds: "
                         "its latent is not in input_ids (a span cut off by max_new_tokens cannot be continued)")


def check_inputs(inputs, kwargs) -> None:
    """What HF would only trip over deep inside: no rows, an empty prompt, images without their grid."""
    input_ids = kwargs.get("input_ids", inputs)
    if torch.is_tensor(input_ids) and input_ids.dim() == 2:
        if input_ids.shape[0] == 0:
            raise ValueError(f"input_ids: no rows (shape {tuple(input_ids.shape)}); pass at least one prompt")
        if input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: empty prompts (shape {tuple(input_ids.shape)}); pass at least one token")
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.shape == input_ids.shape:
            empty = (~mask.bool().any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"attention_mask: rows {empty} mask out their whole prompt (empty prompts)")
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if kwargs.get(pixels) is not None and kwargs.get(grid) is None:
            raise ValueError(f"{grid}: required with {pixels} (the image processor returns both)")
