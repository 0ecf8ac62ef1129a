"""Samples -> training batches: chat prompt + teacher response, labels, images and latent targets (SPEC 4.4, 4.5).

The prompt is the one curation and evaluation ask (``gapkern.data.prompts``: the
images, then ``gapkern.data.question_text``). A line that trains with latents
(``gapkern.data.uses_latents``: hard, or not curated) keeps its latent steps
and its targets fill the latent slots; an easy line trains on the plain-text
teacher response. Prompt tokens are labelled -100, response tokens (through
the chat template's end of turn) with their ids. Rows are padded on the right.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ..data import image_inputs, teacher_response, uses_latents
from ..data.images import image_settings as default_image_settings
from ..data.prompts import expand_images, prompt_messages, prompt_text, visual_tokens

__all__ = ["GapCollator"]

IGNORE = -100


class GapCollator:
    """``collator(samples) -> batch`` for ``GapQwen2_5_VLForConditionalGeneration.forward``.

    ``model_config`` is the Qwen2.5-VL config (image token, vision settings,
    hidden size), ``gap_config`` the GapConfig (profile tokens, K), ``targets``
    a ``TargetReader`` (needed as soon as a hard line has a latent step),
    ``image_settings`` as from ``gapkern.data.images.image_settings``.

    The batch: ``input_ids``, ``attention_mask``, ``labels``,
    ``mm_token_type_ids`` (B, L), right-padded with the tokenizer's pad id
    (labels -100, mask 0); ``pixel_values`` / ``image_grid_thw`` of every image
    in row order (absent when no row has one); ``latent_targets (S, D)``, the
    targets of every latent slot, batch-major then in position order
    (``(0, D)`` when there is none).
    """

    def __init__(self, tokenizer, model_config, gap_config, *, targets=None, image_settings: dict | None = None):
        self.tokenizer, self.gap_config, self.targets = tokenizer, gap_config, targets
        self.vision_config = model_config.vision_config
        self.image_token_id = model_config.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.hidden_size = model_config.text_config.hidden_size
        self.settings = image_settings or default_image_settings(None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer: has neither a pad nor an eos token to pad rows with")
        self.pad_id = pad

    def __call__(self, samples: list[dict]) -> dict:
        rows = [self.encode(s) for s in samples]

        def padded(key, fill):
            return pad_sequence([torch.tensor(r[key]) for r in rows], batch_first=True, padding_value=fill,
                                padding_side="right")

        batch = {
            "input_ids": padded("input_ids", self.pad_id),
            "attention_mask": pad_sequence([torch.ones(len(r["input_ids"]), dtype=torch.long) for r in rows],
                                           batch_first=True, padding_value=0, padding_side="right"),
            "labels": padded("labels", IGNORE),
            "mm_token_type_ids": padded("mm_token_type_ids", 0),
            "latent_targets": torch.cat([r["latent_targets"] for r in rows]),
        }
        images = [r for r in rows if r["image_grid_thw"] is not None]
        if images:
            batch["pixel_values"] = torch.cat([r["pixel_values"] for r in images])
            batch["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in images])
        return batch

    def encode(self, sample: dict) -> dict:
        """One row, unpadded: token and label lists, its images' pixels, its latent targets (slots, D)."""
        latent = uses_latents(sample)
        pixels = [image_inputs(p, self.vision_config, settings=self.settings) for p in sample.get("images", [])]
        counts = [n for p in pixels for n in visual_tokens(p["image_grid_thw"], self.vision_config)]
        prompt, full = self._texts(sample, teacher_response(sample, self.gap_config, latent=latent))
        prompt, full = expand_images(prompt, self.image_token, counts), expand_images(full, self.image_token, counts)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if start >= len(prompt) else IGNORE for t, (start, _) in zip(ids, enc["offset_mapping"])]
        targets = self._targets(sample, latent, ids.count(self.gap_config.latent_pad_id))
        return {
            "input_ids": ids, "labels": labels,
            "mm_token_type_ids": [int(t == self.image_token_id) for t in ids],
            "pixel_values": torch.cat([p["pixel_values"] for p in pixels]) if pixels else None,
            "image_grid_thw": torch.cat([p["image_grid_thw"] for p in pixels]) if pixels else None,
            "latent_targets": targets,
        }

    def _texts(self, sample: dict, response: str) -> tuple[str, str]:
        """The chat template's prompt (up to the assistant's turn) and the whole conversation."""
        prompt = prompt_text(self.tokenizer, sample)
        answer = {"role": "assistant", "content": response}
        full = self.tokenizer.apply_chat_template(prompt_messages(sample) + [answer], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(f"tokenizer: its chat template does not write the conversation of sample "
                             f"{sample['id']!r} as the generation prompt followed by the answer")
        return prompt, full

    def _targets(self, sample: dict, latent: bool, slots: int) -> torch.Tensor:
        """The sample's targets stacked (slots, D), checked against the slots its tokens hold."""
        if not latent or not any("latent" in s for s in sample.get("steps") or []):
            found = torch.zeros(0, self.hidden_size)
        elif self.targets is None:
            raise ValueError(f"targets: sample {sample['id']!r} has latent steps but no target folder was given")
        else:
            found = self.targets.targets(sample)
            found = found.reshape(-1, found.shape[-1])
        if found.shape[1] != self.hidden_size:
            raise ValueError(f"targets: width {found.shape[1]} for sample {sample['id']!r}, expected the model's "
                             f"hidden size {self.hidden_size}")
        if found.shape[0] != slots:
            raise ValueError(f"targets: sample {sample['id']!r} has {slots} latent slots in its tokens but "
                             f"{found.shape[0]} target rows (K={self.gap_config.latent_budget} per latent step)")
        return found

