"""What tests, benchmarks and the demo build on, kept out of the model API.

Tiny random Qwen2.5-VL models and inputs (``tiny_qwen2_5_vl``, ``tiny_head``, ``tiny_prompts``,
``tiny_tokenizer``, ``TinyIds``), ``ForceTokens`` (a logits processor that scripts tokens, e.g.
a latent span at a given position), and ``naive_generate``: the latent-aware generate written
the obvious way, recomputing the whole sequence every step (the reference the decode loop is
checked and timed against).
"""
from ..sampling import ForceTokens  # product code's logits processor, re-exported for the tests
from .reference import latent_step64, naive_generate
from .tiny import TinyIds, tiny_head, tiny_prompts, tiny_qwen2_5_vl, tiny_tokenizer

__all__ = ["ForceTokens", "TinyIds", "tiny_head", "tiny_prompts", "tiny_qwen2_5_vl", "tiny_tokenizer",
           "naive_generate", "latent_step64"]
