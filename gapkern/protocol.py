"""Evaluation protocols as data (SPEC 4.6): how a model is asked and how it samples.

A protocol is a small JSON object (:data:`FIELDS`): ``system_prompt`` (None:
no system turn), ``prompt`` (``gap``: the question, ``A. red`` lines and the
answer instruction; ``vlmevalkit``: the prompt VLMEvalKit's dataset class builds,
:func:`vlmevalkit_text`), ``answer_instruction`` (``{"choice": ..., "open": ...}``, the
last line of a ``gap`` prompt; None: none), the sampling settings
(``temperature`` 0 greedy, ``top_k``, ``top_p``, ``repetition_penalty``,
``max_new_tokens``) and ``min_pixels`` / ``max_pixels`` (None: the
checkpoint's preprocessor_config.json). Presets: ``gap`` (gapkern's own) and
``monet`` (NOVAglow646/Monet ``inference/load_and_gen_vllm.py``: temperature
0.1, top_k 50, top_p 0.8, repetition penalty 1.01, 4096 new tokens, 256*28*28
to 8192*28*28 pixels; its README's VLMEvalKit system prompt).

The protocol fixes every generation setting: :func:`own_generation_config`
swaps a checkpoint's ``generation_config.json`` (Qwen2.5-VL-7B-Instruct ships
repetition_penalty 1.05, top_k 1, ...) for one that keeps only its token ids,
for the duration of a run, and says what it set aside.
"""
from __future__ import annotations

import contextlib
import os

__all__ = ["PRESETS", "FIELDS", "load_protocol", "user_text", "logits_processors", "own_generation_config",
           "image_bounds", "set_aside", "sampling"]

from .data.schema import ANSWER_FORMAT

GAP_INSTRUCTION = {"choice": ANSWER_FORMAT[True], "open": ANSWER_FORMAT[False]}
MONET_SYSTEM = ("You are a helpful multimodal assistant. You are required to answer the question based on the "
                "image provided. Put your final answer in \\boxed{}.")

FIELDS = ("name", "system_prompt", "prompt", "answer_instruction", "temperature", "top_k", "top_p",
          "repetition_penalty", "max_new_tokens", "min_pixels", "max_pixels")
PRESETS = {
    "gap": {"name": "gap", "system_prompt": None, "prompt": "gap", "answer_instruction": GAP_INSTRUCTION,
            "temperature": 0.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0, "max_new_tokens": 512,
            "min_pixels": None, "max_pixels": None},
    "monet": {"name": "monet", "system_prompt": MONET_SYSTEM, "prompt": "vlmevalkit", "answer_instruction": None,
              "temperature": 0.1, "top_k": 50, "top_p": 0.8, "repetition_penalty": 1.01, "max_new_tokens": 4096,
              "min_pixels": 256 * 28 * 28, "max_pixels": 8192 * 28 * 28},
}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
NOT_SAMPLING = ("transformers_version", "_from_model_config", "use_cache", "output_attentions",
                "output_hidden_states", "output_scores", "return_dict_in_generate")  # not how tokens are drawn


def load_protocol(value: str) -> dict:
    """A preset's name or a JSON file: the full protocol (a file's missing fields from the ``gap`` preset)."""
    from ._io import read_json

    if value in PRESETS:
        return dict(PRESETS[value])
    if not os.path.isfile(value):
        raise ValueError(f"--protocol: expected {' or '.join(PRESETS)} or a JSON file, got {value!r} (no such file)")
    try:
        data = read_json(value)
    except ValueError as e:
        raise ValueError(f"--protocol: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--protocol: {value!r} holds a JSON {type(data).__name__}, expected an object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"--protocol: {value!r}: unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    out = {**PRESETS["gap"], "name": os.path.splitext(os.path.basename(value))[0], **data}
    _check(out, value)
    return out


def _check(p: dict, where: str) -> None:
    def fail(field, expected):
        raise ValueError(f"--protocol: {where!r}: {field}: expected {expected}, got {p[field]!r}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if p["system_prompt"] is not None and not isinstance(p["system_prompt"], str):
        fail("system_prompt", "a string or null")
    if p["prompt"] not in ("gap", "vlmevalkit"):
        fail("prompt", "'gap' or 'vlmevalkit'")
    ins = p["answer_instruction"]
    if ins is not None and not (isinstance(ins, dict) and set(ins) == {"choice", "open"}
                                and all(isinstance(v, str) for v in ins.values())):
        fail("answer_instruction", "null or {\"choice\": TEXT, \"open\": TEXT}")
    if not (number(p["temperature"]) and p["temperature"] >= 0):
        fail("temperature", "a number >= 0 (0: greedy)")
    if p["top_k"] is not None and not (isinstance(p["top_k"], int) and p["top_k"] >= 1):
        fail("top_k", "null or an integer >= 1")
    if p["top_p"] is not None and not (number(p["top_p"]) and 0 < p["top_p"] <= 1):
        fail("top_p", "null or a number in (0, 1]")
    if not (number(p["repetition_penalty"]) and p["repetition_penalty"] > 0):
        fail("repetition_penalty", "a number > 0 (1: none)")
    if not (isinstance(p["max_new_tokens"], int) and p["max_new_tokens"] >= 1):
        fail("max_new_tokens", "an integer >= 1")
    for field in ("min_pixels", "max_pixels"):
        if p[field] is not None and not (isinstance(p[field], int) and p[field] >= 1):
            fail(field, "null or an integer >= 1")


def user_text(sample: dict, protocol: dict | None) -> str:
    """The user turn's text of a sample under ``protocol`` (None: the ``gap`` preset)."""
    protocol = protocol or PRESETS["gap"]
    choices = sample.get("choices") or []
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if protocol["prompt"] == "vlmevalkit":
        return vlmevalkit_text(sample)
    lines = [sample["question"].strip()] + [f"{k}. {c}" for k, c in zip(letters, choices)]
    if protocol["answer_instruction"]:
        lines.append(protocol["answer_instruction"]["choice" if choices else "open"])
    return "\n".join(lines)


# the instruction VLMEvalKit's MMERealWorld.build_prompt appends (vlmeval/dataset/image_mcq.py, MMERealWorld.SYS)
MME_REALWORLD = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
                 "the letter (A, B, C, D, or E) of the correct option. \nThe best answer is:")


def vlmevalkit_text(sample: dict) -> str:
    """The text VLMEvalKit's dataset class puts after the images (vlmeval/dataset/image_mcq.py, image_base.py):
    MathVista the question alone (its question lists the choices), MME-RealWorld the question, its
    ``multi-choice options`` and its instruction, WeMath Hint / Question / Options, any other benchmark
    ImageMCQDataset's Hint / Question / Options and "Please select ..." (the question alone without options)."""
    task, meta = str(sample.get("task", "")), sample.get("meta") or {}
    if task.startswith("MathVista"):
        return sample["question"]
    if task.startswith("MME-RealWorld") and meta.get("multi-choice options"):
        return f"{sample['question']} {meta['multi-choice options']}\n{MME_REALWORLD}"
    choices = sample.get("choices") or []
    text = f"Hint: {meta['hint']}\n" if meta.get("hint") else ""
    text += f"Question: {sample['question']}\n"
    if choices:
        text += "Options:\n" + "".join(f"{chr(ord('A') + i)}. {c}\n" for i, c in enumerate(choices))
        if not task.startswith("WeMath"):
            text += "Please select the correct answer from the options above. \n"
    return text


def logits_processors(protocol: dict, seeds: list[int], prompt_len: int) -> list:
    """The processors that draw each token under ``protocol``: repetition penalty, then (when sampling) temperature,
    top-k and top-p, then the seeded draw (:class:`gapkern.sampling.SeededSampler`)."""
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    from .sampling import SeededSampler

    out = []
    if protocol["repetition_penalty"] != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(float(protocol["repetition_penalty"])))
    t = float(protocol["temperature"])
    if t > 0 and (protocol["top_k"] is not None or protocol["top_p"] is not None):
        out.append(TemperatureLogitsWarper(t))
        if protocol["top_k"] is not None:
            out.append(TopKLogitsWarper(int(protocol["top_k"])))
        if protocol["top_p"] is not None:
            out.append(TopPLogitsWarper(float(protocol["top_p"])))
        t = 1.0  # the logits are scaled already
    out.append(SeededSampler(seeds, prompt_len, t))
    return out


def sampling(protocol: dict) -> dict:
    """The protocol's generation settings (what a run records as effective)."""
    return {k: protocol[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")}


def set_aside(generation_config) -> dict:
    """The settings of a checkpoint's generation config other than its token ids (what a run does not use)."""
    return {k: v for k, v in generation_config.to_diff_dict().items()
            if k not in TOKEN_IDS and k not in NOT_SAMPLING}


@contextlib.contextmanager
def own_generation_config(model):
    """``model.generation_config`` holds only the checkpoint's token ids while the block runs; yields the settings
    it set aside (the checkpoint's own, e.g. ``{"repetition_penalty": 1.05, ...}``)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    kept = {k: getattr(saved, k, None) for k in TOKEN_IDS if getattr(saved, k, None) is not None}
    aside = set_aside(saved)
    model.generation_config = GenerationConfig(**kept)
    try:
        yield aside
    finally:
        model.generation_config = saved


def image_bounds(protocol: dict | None, settings: dict) -> dict:
    """``settings`` (``gapkern.data.images.image_settings``) with the protocol's pixel range where it gives one."""
    if protocol is None:
        return settings
    return {**settings, **{k: protocol[k] for k in ("min_pixels", "max_pixels") if protocol[k] is not None}}
