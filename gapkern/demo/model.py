"""The demo's tiny Qwen2.5-VL (random init from a config) and its word-level tokenizer over the task's words."""
from __future__ import annotations

import re

from ..data import ANSWER_FORMAT
from ..testing import TinyIds, tiny_qwen2_5_vl, tiny_tokenizer
from . import task

__all__ = ["TAGS", "vocabulary", "demo_tokenizer", "demo_model", "SIZES"]

TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # the teacher response's tags, matched inside words
LETTERS = ("A", "B", "C", "D")
# hidden, layers, heads, vision width: what DEMO_NOTES measured learnable in minutes on a CPU
SIZES = {"full": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vision_hidden_size=32),
         "small": dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vision_hidden_size=16)}


def vocabulary() -> list[str]:
    """Every word the demo's prompts and teacher responses hold, ``<unk>`` first (the unknown word)."""
    pieces = list(task.texts()) + [ANSWER_FORMAT[True], "user assistant system"]
    pieces += [f"{letter}. {letter}" for letter in LETTERS]
    split = re.compile("|".join(map(re.escape, TAGS)))
    words = ["<unk>", *TAGS]
    for piece in pieces:
        for word in " ".join(split.split(piece)).split():
            if word not in words:
                words.append(word)
    return words


def demo_tokenizer():
    """The tiny model's special ids (:class:`TinyIds`), then one id per :func:`vocabulary` word."""
    words = vocabulary()
    ids = TinyIds(vocab_size=TinyIds.first_text + len(words))
    return tiny_tokenizer(ids, words, added=TAGS), ids


def demo_model(size: str = "full", seed: int = 0):
    """A random Qwen2.5-VL (Hugging Face's class, float32) sized for the demo, its tokenizer and :class:`TinyIds`."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, got {size!r}")
    tokenizer, ids = demo_tokenizer()
    model, _ = tiny_qwen2_5_vl(seed=seed, vocab_size=ids.vocab_size, init_std=0.02, **SIZES[size])
    return model, tokenizer, ids
