"""Chat prompts of samples, batched with left padding, as Qwen2.5-VL's processor would build them.

One user turn per sample: an image entry per image (``images`` order), then
:func:`gapkern.data.question_text`. The tokenizer's chat template renders it;
each image's one placeholder token is expanded to one token per merged patch.
Left padding puts every row's last prompt token in the last column, where
``generate`` continues.
"""
from __future__ import annotations

import torch

from .images import CLIP_MEAN, CLIP_STD, image_inputs, pixel_inputs
from .samples import question_text

__all__ = ["prompt_messages", "prompt_text", "prompt_batch", "visual_tokens", "expand_images", "image_mask", "to_model",
           "chat_inputs"]


def prompt_messages(sample: dict) -> list[dict]:
    """The chat messages of a sample's question: one user turn, images first."""
    content = [{"type": "image"} for _ in sample.get("images", [])]
    content.append({"type": "text", "text": question_text(sample)})
    return [{"role": "user", "content": content}]


def prompt_text(tokenizer, sample: dict) -> str:
    """The chat template over :func:`prompt_messages`, with the assistant turn opened (one placeholder per image)."""
    return tokenizer.apply_chat_template(prompt_messages(sample), tokenize=False, add_generation_prompt=True)


def visual_tokens(image_grid_thw: torch.Tensor, vision_config) -> list[int]:
    """The visual tokens of each image (a row of ``image_grid_thw``): its patches, spatial_merge_size ** 2 a token."""
    return [int(grid.prod()) // vision_config.spatial_merge_size ** 2 for grid in image_grid_thw]


def expand_images(text: str, image_token: str, counts: list[int]) -> str:
    """Each image's placeholder ``image_token`` repeated to that image's number of visual tokens."""
    parts = text.split(image_token)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"tokenizer: its chat template placed {len(parts) - 1} {image_token!r} for "
                         f"{len(counts)} image(s)")
    out = [parts[0]]
    for count, part in zip(counts, parts[1:]):
        out += [image_token * count, part]
    return "".join(out)


def image_mask(input_ids: torch.Tensor, image_id: int, image_token: str, expected: int) -> torch.Tensor:
    """Where ``input_ids`` hold the image token, checked to be the ``expected`` visual tokens (a tokenizer that
    split the expanded placeholders would hand the visual features to the wrong positions)."""
    mask = input_ids == image_id
    if int(mask.sum()) != expected:
        raise ValueError(f"tokenizer: {image_token!r} did not tokenize to the model's image token id {image_id}")
    return mask


def to_model(batch: dict, model) -> dict:
    """The batch on the model's device, its floating tensors (the pixels) in the model's dtype; transformers'
    ``BatchFeature.to`` leaves the integer tensors' dtype alone."""
    from transformers import BatchFeature

    return dict(BatchFeature(batch).to(model.device, dtype=model.dtype))


def prompt_batch(model, tokenizer, samples: list[dict], *, settings: dict | None = None) -> dict:
    """``input_ids``, ``attention_mask`` (left-padded), ``mm_token_type_ids``, and the images' ``pixel_values`` /
    ``image_grid_thw`` (absent when no sample has an image), on the CPU."""
    vision, image_id = model.config.vision_config, model.config.image_token_id
    image_token = tokenizer.convert_ids_to_tokens(image_id)
    texts, pixels, expected = [], [], 0
    for sample in samples:
        inputs = [image_inputs(path, vision, settings=settings) for path in sample.get("images", [])]
        counts = [n for i in inputs for n in visual_tokens(i["image_grid_thw"], vision)]
        texts.append(expand_images(prompt_text(tokenizer, sample), image_token, counts))
        pixels += inputs
        expected += sum(counts)
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True, padding_side="left"))
    batch["mm_token_type_ids"] = image_mask(batch["input_ids"], image_id, image_token, expected).long()
    if pixels:
        batch["pixel_values"] = torch.cat([i["pixel_values"] for i in pixels])
        batch["image_grid_thw"] = torch.cat([i["image_grid_thw"] for i in pixels])
    return batch


def chat_inputs(model, tokenizer, prompt: str, image: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> dict:
    """One row: the chat template around ``prompt`` and one image, ready for ``model.generate``."""
    image_id = model.config.image_token_id
    pixels = pixel_inputs(image, model.config.vision_config, mean, std)
    counts = visual_tokens(pixels["image_grid_thw"], model.config.vision_config)
    image_token = tokenizer.convert_ids_to_tokens(image_id)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(expand_images(text, image_token, counts), return_tensors="pt")["input_ids"]
    mask = image_mask(input_ids, image_id, image_token, sum(counts))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": mask.long(), **pixels}
