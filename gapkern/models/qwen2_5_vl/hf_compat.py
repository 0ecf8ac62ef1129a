"""Every transformers internal gapkern reads or writes, in one place.

The latent-aware generate runs as Hugging Face's custom decoding loop and
drives the language model itself, training builds its own M-RoPE positions,
and the vision-only loader runs the tower without the model, so gapkern
reads things that moved between the releases pyproject admits (tested: 5.17,
the floor, and 5.24):

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
  conversation's positions come from them);
- Qwen2.5-VL's module layout: ``model.model.language_model`` (and its final
  ``norm``), ``model.model.visual``, the module names LoRA targets and
  training freezes by, ``model.model.get_rope_index``, and
  ``Qwen2_5_VLModel.get_image_features`` reading only ``.visual`` (the
  vision-only loader runs it on the tower alone, built with the private
  ``_attn_implementation`` set);
- the ``{"full_attention": mask}`` mapping the language model takes instead
  of building its own mask (the static decode step prebuilds it);
- the one registry write: the checkpoint key renaming registered for the Gap
  class (transformers skips it for classes defined outside it).

tests/models/test_transformers_contract.py checks each of these on the installed
release, so a release that changes one fails there with its name, not deep in
a decode step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re

import transformers

MIN_VERSION = "5.17"
TESTED = "5.17 to 5.25"  # what CI runs: the floor (constraints.txt) and the latest release


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


# ---- Qwen2.5-VL's module layout ---------------------------------------------------------------------------------
LANGUAGE_MODEL = "model.language_model."  # the language model's parameter / module names start with this
VISION_TOWER = "model.visual."  # the vision tower's (merger included)


def language_model(model):
    """The text decoder (embeddings, layers, final norm) of a Qwen2.5-VL ``...ForConditionalGeneration``."""
    return private(model.model, "language_model")


def final_norm(model):
    """The language model's final norm: its input is the last layer's hidden state."""
    return private(language_model(model), "norm")


def vision_tower(model):
    """The vision tower with its merger (``model.model.visual``)."""
    return private(model.model, "visual")


def rope_index(model, input_ids, mm_token_type_ids, image_grid_thw=None, attention_mask=None, **more):
    """(position_ids (3, B, L), rope deltas (B, 1)): Qwen2.5-VL's M-RoPE over a whole sequence, padding-aware;
    ``more``: ``video_grid_thw``, ``second_per_grid_ts``."""
    index = private(model.model, "get_rope_index")
    return index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask, **more)


def rope_deltas(model):
    """The rope deltas HF keeps on ``model.model`` between generate calls (a continuation's positions)."""
    return private(model.model, "rope_deltas")


def set_rope_deltas(model, deltas) -> None:
    private(model.model, "rope_deltas")  # a clear error if the attribute is gone, not a new one set silently
    model.model.rope_deltas = deltas


def tower_image_features(owner, pixels, grid_thw):
    """``Qwen2_5_VLModel.get_image_features`` run on ``owner``, anything with a ``.visual`` tower: the
    vision-only loader has no language model."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    return Qwen2_5_VLModel.get_image_features(owner, pixels, grid_thw)


def new_vision_tower(vision_config):
    """An empty Qwen2.5-VL vision tower for ``vision_config``, with sdpa attention, in the default dtype."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision_config._attn_implementation = "sdpa"  # a config loaded alone has no attention kernel settled
    return Qwen2_5_VisionTransformerPretrainedModel(vision_config)


def prebuilt_mask(attention: str, valid: torch.Tensor, dtype: torch.dtype):
    """What the language model takes as ``attention_mask`` for ``valid`` (B, L) bool over the cache without
    building a mask of its own (graph-safe: no host reads): ``{"full_attention": (B, 1, 1, L)}``, boolean for
    sdpa, an additive bias for eager; other kernels get the 2-D mask (they build theirs, eager path only)."""
    if attention == "sdpa":
        return {"full_attention": valid[:, None, None, :]}
    if attention == "eager":
        bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
        return {"full_attention": bias.masked_fill(~valid, torch.finfo(dtype).min)[:, None, None, :]}
    return valid.long()


def register_checkpoint_layout(cls, base) -> None:
    """Let ``cls`` (a subclass of transformers' ``base`` defined outside it) read and write ``base``'s
    checkpoint layout (``model.layers.*``, ``visual.*``): transformers skips its key renaming for classes it
    does not know by name. Registers ``cls`` only; ``base``'s own entry is untouched."""
    from transformers import conversion_mapping as cm

    mapping = cm.get_checkpoint_conversion_mapping(base.__name__)
    if mapping is not None:
        cm.register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


@contextlib.contextmanager
def default_weight_mapping(model):
    """Inside the block, ``save_pretrained`` writes ``model`` with transformers' default key mapping, not the one
    ``from_pretrained`` left on it: transformers keeps the renamings a load applied in ``model._weight_conversions``
    and its save reverts them (``core_model_loading.revert_weight_conversion``); with the attribute None it uses the
    default mapping without the legacy renamings. The attribute comes back on exit."""
    kept = model.__dict__.get("_weight_conversions")
    model._weight_conversions = None
    try:
        yield model
    finally:
        model._weight_conversions = kept
