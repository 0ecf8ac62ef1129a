"""What the decode loop relies on in transformers beyond its public API, in one place.

The latent-aware generate runs as Hugging Face's custom decoding loop and
drives the language model itself, so it reads things that moved between the
releases pyproject admits (tested: 5.17, the floor, and 5.24):

- the keyword arguments ``generate`` hands the loop: the cache (5.17 names it
  ``past_key_values``, 5.24 ``cache``), an ``attention_mask`` that 5.24 drops to
  None when it is all ones, the images as ``pixel_values`` (5.17) or already
  encoded (5.24: ``mm_encoder_outputs``);
- ``config._attn_implementation``, ``generation_config._pad_token_tensor``,
  ``GenerationMixin._valid_auto_compile_criteria`` (whether HF would compile), how
  transformers' exporters record generate (they wrap ``model.forward``), the
  static cache layers' ``cumulative_length`` (written in place: a captured CUDA
  graph reads it), ``get_image_features(...).pooler_output`` and the rope deltas
  HF keeps on ``model.model.rope_deltas`` between calls (a continued
  conversation's positions come from them).

tests/test_transformers_contract.py checks each of these on the installed
release, so a release that changes one fails there with its name, not deep in
a decode step.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re

import transformers

MIN_VERSION = "5.17"
TESTED = "5.17 to 5.24"


def _release(version: str) -> tuple[int, int]:
    return tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", version).groups())


def check_version(version: str = transformers.__version__) -> None:
    """The loop reads generate's internals as 5.17 shaped them; older releases fail obscurely, so say so here."""
    if _release(version) < _release(MIN_VERSION):
        raise ImportError(f"gapkern's generate needs transformers >= {MIN_VERSION} (tested {TESTED}); "
                          f"found {version}: pip install -U transformers")


check_version()  # before anything below reads transformers' internals

import torch  # noqa: E402
from transformers.generation import GenerateDecoderOnlyOutput  # noqa: E402


def private(obj, name: str):
    """``obj.name`` for an attribute transformers does not promise to keep; a clear error when it is gone."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(
            f"transformers {transformers.__version__}: {type(obj).__name__}.{name} is gone, and gapkern's "
            f"generate relies on it (tested {TESTED}); please report it with this message") from None


def _forward_takes_cache(cls) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def _cache_keyword() -> str:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    return "cache" if _forward_takes_cache(Qwen2_5_VLTextModel) else "past_key_values"


CACHE_KEYWORD = _cache_keyword()  # what the language model's forward calls its cache (the old name warns on 5.24)
OUTPUT_CACHE = ("cache" if "cache" in {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
                else "past_key_values")  # the cache's field in generate's output


def attention_kind(model) -> str:
    """The language model's attention kernel (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    return private(model.model.language_model.config, "_attn_implementation")


def pad_id(generation_config) -> int:
    """The pad id generate settled on (the model's, else EOS's, as HF pads finished rows); 0 if none."""
    pad = private(generation_config, "_pad_token_tensor")
    return 0 if pad is None else int(pad)


def compiles(model, generation_config, cache) -> bool:
    """Whether HF's generate would compile the decode step for this cache (device, ``disable_compile``,
    quantization, offloading); HF logs why not when ``compile_config`` was set. 5.17 looks the cache up as
    ``past_key_values``, 5.24 as ``cache``."""
    criteria = private(model, "_valid_auto_compile_criteria")
    return bool(criteria({"cache": cache, "past_key_values": cache}, generation_config))


def exporting(model) -> bool:
    """Whether transformers' exporters are recording this generate's ``forward()`` calls:
    ``exporters.utils.decompose_prefill_decode`` sets ``model.forward`` to a wrapper of its own."""
    code = getattr(model.__dict__.get("forward"), "__code__", None)
    return code is not None and os.path.join("transformers", "exporters") in code.co_filename


def static_lengths(cache) -> list[torch.Tensor]:
    """Each static cache layer's write position: a device tensor its ``update`` advances in place."""
    return [private(layer, "cumulative_length") for layer in cache.layers]


def pop_cache(model_kwargs: dict):
    """The cache generate handed the loop (under either name), or None."""
    found = [model_kwargs.pop(name) for name in ("cache", "past_key_values") if name in model_kwargs]
    found = [c for c in found if c is not None]
    return found[0] if found else None


def visual_features(model, model_kwargs: dict, kind: str) -> torch.Tensor | None:
    """The merger outputs (N, D) of a prompt's images (``kind="image"``) or videos, in prompt order.

    5.24 encodes them before the loop (``mm_encoder_outputs``); 5.17 hands the
    loop ``pixel_values`` and the grid. Pops what it reads.
    """
    encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get(kind)
    pixels = model_kwargs.pop("pixel_values" if kind == "image" else "pixel_values_videos", None)
    grid = model_kwargs.pop(f"{kind}_grid_thw", None)
    if encoded is not None:
        return torch.cat(tuple(encoded.pooler_output))
    return None if pixels is None else torch.cat(merger_outputs(model, pixels, grid, kind))


def merger_outputs(model, pixels: torch.Tensor, grid_thw: torch.Tensor, kind: str = "image") -> tuple:
    """The merger outputs of each image (or video) of ``pixels``: one ``(tokens, D)`` tensor each, in order
    (``get_image_features(...).pooler_output``): the one place gapkern runs the vision tower."""
    encode = model.model.get_image_features if kind == "image" else model.model.get_video_features
    return tuple(encode(pixels, grid_thw).pooler_output)
