"""Tiny random Qwen2.5-VL models and inputs: tests, the CLI and benchmarks run on them without weights.

:class:`TinyIds` fixes which ids play the special tokens (latent start / end /
pad, image pad, vision start / end, EOS, pad); :func:`tiny_tokenizer` is a
word-level tokenizer over those ids, with a Qwen-style chat template.
Images are random pixels, already in the patch layout the Qwen2.5-VL image
processor produces: ``pixel_values`` (patches, 3 * 2 * 14 * 14) and
``image_grid_thw`` (images, 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GapConfig
from ..head import PCALatentHead


@dataclass(frozen=True)
class TinyIds:
    pad: int = 0
    eos: int = 1
    latent_start: int = 2
    latent_end: int = 3
    latent_pad: int = 4
    image_pad: int = 5
    video_pad: int = 6
    vision_start: int = 7
    vision_end: int = 8
    im_start: int = 9
    parser_open: int = 10
    parser_close: int = 11
    first_text: int = 16  # ids from here up to vocab_size - 1 are plain text
    vocab_size: int = 128

    def gap_config(self, **kw) -> GapConfig:
        return GapConfig(latent_start_id=self.latent_start, latent_end_id=self.latent_end,
                         latent_pad_id=self.latent_pad, **kw)


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(ids: TinyIds | None = None, words=None, added=()):
    """A word-level tokenizer for the tiny model: Qwen2.5-VL's special tokens and the gap profile's
    tokens at the :class:`TinyIds`, then one id per word from ``ids.first_text``.

    ``words``: the text vocabulary, ``vocab_size - first_text`` distinct strings without whitespace
    (default ``w16`` ... ``w127``); an unknown word reads as the first. ``added``: words matched anywhere
    in the text before it is split at whitespace (``<answer>`` in ``<answer>B</answer>``), kept on
    decoding; each must be one of ``words``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = ids or TinyIds()
    words = [f"w{i}" for i in range(ids.first_text, ids.vocab_size)] if words is None else list(words)
    if len(set(words)) != len(words) or len(words) != ids.vocab_size - ids.first_text:
        raise ValueError(f"words: expected {ids.vocab_size - ids.first_text} distinct words "
                         f"(vocab_size - first_text), got {len(set(words))} distinct of {len(words)}")
    if any(not w or w != "".join(w.split()) for w in words):
        raise ValueError("words: expected non-empty strings without whitespace")
    if not set(added) <= set(words):
        raise ValueError(f"added: {sorted(set(added) - set(words))} are not among the words")
    special = {"<|endoftext|>": ids.pad, "<|im_end|>": ids.eos, "<latent>": ids.latent_start,
               "</latent>": ids.latent_end, "<latent_pad>": ids.latent_pad, "<|image_pad|>": ids.image_pad,
               "<|video_pad|>": ids.video_pad, "<|vision_start|>": ids.vision_start,
               "<|vision_end|>": ids.vision_end, "<|im_start|>": ids.im_start, "<parser>": ids.parser_open,
               "</parser>": ids.parser_close}
    reserved = {f"<|reserved_{i}|>": i for i in range(ids.first_text) if i not in special.values()}
    # every id below vocab_size has a token, so tokens added later get new ids
    vocab = {**special, **reserved, **{w: ids.first_text + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins the words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0], pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", chat_template=_CHAT_TEMPLATE)


def tiny_qwen2_5_vl(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    num_kv_heads: int = 2, vocab_size: int = 128, vision_depth: int = 1,
                    vision_hidden_size: int = 32, dtype=torch.float32, attn_implementation: str = "sdpa",
                    init_std: float = 0.2, model_class=None, intermediate_size: int | None = None, device=None):
    """A random ``Qwen2_5_VLForConditionalGeneration`` (eval mode) and its :class:`TinyIds`.

    ``init_std`` is wider than Qwen's 0.02 so that attention, not just the last
    token's embedding, decides the next token, and greedy choices are decisive
    (cached and recomputed decoding pick the same tokens). The weights are
    created and initialised on ``device`` in ``dtype`` (a 7B-shaped model builds
    in seconds on a GPU); ``intermediate_size`` defaults to ``2 * hidden_size``.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = TinyIds(vocab_size=vocab_size)
    head_dim = hidden_size // num_heads
    half = head_dim // 2  # M-RoPE splits the rotary half into temporal / height / width sections
    section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=1024, eos_token_id=ids.eos, pad_token_id=ids.pad, bos_token_id=None,
            initializer_range=init_std,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
            num_heads=2, out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1], window_size=56,
            initializer_range=init_std,
        ),
        image_token_id=ids.image_pad, video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
    )
    config._attn_implementation = attn_implementation
    cls = model_class or Qwen2_5_VLForConditionalGeneration
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
            torch.manual_seed(seed)
            model = cls(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = ids.eos
    model.generation_config.pad_token_id = ids.pad
    return model.to(dtype).eval(), ids


def tiny_head(model, rank: int = 8, whitened: bool = True, seed: int = 0) -> PCALatentHead:
    """A PCA head with a random orthonormal basis, in the model's dtype and device."""
    dim = model.config.text_config.hidden_size
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))
    mean = 0.1 * torch.randn(dim, generator=g, dtype=torch.float64)
    sigma = torch.rand(rank, generator=g, dtype=torch.float64) + 0.5 if whitened else None
    head = PCALatentHead(basis.float().contiguous(), mean.float(), None if sigma is None else sigma.float())
    with torch.no_grad():  # move away from the exact PCA projection, as training would
        head.weight.add_(0.05 * torch.randn(head.weight.shape, generator=g))
    return head.to(device=model.device, dtype=model.dtype)


def tiny_prompts(ids: TinyIds, rows, seed: int = 0, patch_size: int = 14, merge_size: int = 2,
                 temporal_patch_size: int = 2, device=None) -> dict:
    """A left-padded batch like the Qwen2.5-VL processor's output.

    Each row is ``(text_len, image)`` or ``(text_len, image, ends_with_start)``,
    ``image`` a ``(height, width)`` in pixels (multiples of 28) or None. A row
    reads: one text token, ``<vision_start> <image_pad>* <vision_end>`` when it
    has an image, ``text_len`` text tokens, then the latent start token when
    ``ends_with_start``.
    """
    g = torch.Generator().manual_seed(seed)
    seqs, grids, pixels = [], [], []
    for row in rows:
        text_len, image, ends_with_start = (tuple(row) + (False,))[:3]
        seq = [ids.first_text + int(torch.randint(ids.vocab_size - ids.first_text, (1,), generator=g))]
        if image is not None:
            h, w = image[0] // patch_size, image[1] // patch_size
            grids.append([1, h, w])
            pixels.append(torch.randn(h * w, 3 * temporal_patch_size * patch_size**2, generator=g))
            seq += [ids.vision_start] + [ids.image_pad] * (h * w // merge_size**2) + [ids.vision_end]
        seq += (ids.first_text + torch.randint(ids.vocab_size - ids.first_text, (text_len,), generator=g)).tolist()
        if ends_with_start:
            seq.append(ids.latent_start)
        seqs.append(seq)
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([[ids.pad] * (width - len(s)) + s for s in seqs])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == ids.image_pad).long(),
    }
    if grids:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.tensor(grids)
    return {k: v.to(device) if device is not None else v for k, v in batch.items()}
