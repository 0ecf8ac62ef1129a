"""What the latent-aware generate relies on in transformers beyond its public API (gapkern.models.qwen2_5_vl.hf_compat).

Each test pins one behaviour of the installed release; a release that changes it fails here, by name,
instead of generating wrong tokens. CI runs this file on the floor (5.17) and on the latest release.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache

from gapkern.models.qwen2_5_vl import hf_compat as hf, inputs
from gapkern.testing import tiny_prompts, tiny_qwen2_5_vl

pytestmark = pytest.mark.usefixtures("one_thread")
VERSION = f"transformers {transformers.__version__}"
ROWS = [(4, None), (2, (56, 56)), (3, (56, 84))]
KNOWN = {"attention_mask", "position_ids", "cache", "past_key_values", *inputs.VISUAL, *inputs.IGNORED}


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0)


def loop_call(model, **kw):
    """What ``generate`` hands a custom decoding loop (an unpatched model, so only HF prepares it)."""
    seen = {}

    def spy(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
            streamer=None, **model_kwargs):
        seen.update(model_kwargs, input_ids=input_ids, generation_config=generation_config)
        return input_ids

    model.generate(**kw, max_new_tokens=3, do_sample=False, custom_generate=spy)
    return seen


def test_version_check_names_the_floor():
    for old in ("5.16.2", "4.57.0"):
        with pytest.raises(ImportError, match=r"transformers >= 5\.17 .*found " + old):
            hf.check_version(old)
    for ok in ("5.17.0", "5.17.0.dev0", "5.24.0", transformers.__version__):
        hf.check_version(ok)


def test_private_attribute_gone_names_the_release():
    with pytest.raises(RuntimeError, match=rf"{VERSION}: GenerationConfig\._gone_ is gone"):
        hf.private(transformers.GenerationConfig(), "_gone_")


@pytest.mark.parametrize("rows", [ROWS, ROWS[1:2], ROWS[:1]], ids=["padded-images", "one-image", "text"])
def test_loop_receives_only_keywords_decode_handles(tiny, rows):
    model, ids = tiny
    seen = loop_call(model, **tiny_prompts(ids, rows, seed=1))
    new = set(seen) - KNOWN - {"input_ids", "generation_config"}
    assert not new, (f"{VERSION} hands custom decoding loops new keywords {sorted(new)}: make "
                     "gapkern.models.qwen2_5_vl.inputs.take_prompt use them (or list them in IGNORED if they change "
                     "nothing)")
    caches = [seen[k] for k in ("cache", "past_key_values") if seen.get(k) is not None]
    assert len(caches) == 1 and isinstance(caches[0], Cache) and caches[0].get_seq_length() == 0, (
        f"{VERSION}: the loop no longer gets one fresh cache as 'cache' or 'past_key_values' ({caches})")


def test_attention_mask_reaches_the_loop_whole_or_as_none_when_all_ones(tiny):
    """5.24 drops an all-ones mask to None; 5.17 passes it. Any other change (a 4-D mask, a padded mask
    dropped) must fail here, and the positions must still cover the whole prompt (continuation checks)."""
    model, ids = tiny
    padded = tiny_prompts(ids, ROWS, seed=1)
    seen = loop_call(model, **padded)
    assert torch.equal(seen["attention_mask"], padded["attention_mask"]), f"{VERSION} changed a padded mask"
    assert seen["position_ids"].shape[-1] == padded["input_ids"].shape[1]
    full = tiny_prompts(ids, ROWS[1:2], seed=1)
    seen = loop_call(model, **full)
    mask = seen["attention_mask"]
    assert mask is None or torch.equal(mask, full["attention_mask"]), f"{VERSION} changed an all-ones mask: {mask}"
    assert seen["position_ids"].shape[-1] == full["input_ids"].shape[1]
    seen.pop("generation_config")
    prompt = inputs.take_prompt(model, seen.pop("input_ids"), seen)
    assert torch.equal(prompt.attention_mask, full["attention_mask"])  # and decode reads what it got


def test_pad_token_tensor_is_prepared_for_the_loop(tiny):
    model, ids = tiny
    gc = loop_call(model, **tiny_prompts(ids, ROWS, seed=1))["generation_config"]
    assert torch.is_tensor(hf.private(gc, "_pad_token_tensor")), f"{VERSION}: _pad_token_tensor is not a tensor"
    assert hf.pad_id(gc) == ids.pad


def test_attn_implementation_follows_set_attn_implementation():
    model, _ = tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    assert hf.attention_kind(model) == "sdpa"
    model.set_attn_implementation("eager")
    assert hf.attention_kind(model) == "eager", f"{VERSION}: set_attn_implementation left the language model's"


def test_static_cache_layers_advance_cumulative_length_in_place(tiny):
    """A captured decode step writes the cache at ``cumulative_length``: it must be one tensor, advanced in place."""
    model, _ = tiny
    text = model.config.text_config
    cache = StaticCache(config=model.config, max_cache_len=8)
    shape = (2, text.num_key_value_heads, 3, text.hidden_size // text.num_attention_heads)
    keys, values = torch.randn(shape), torch.randn(shape)
    cache.update(keys, values, 0)
    lengths = hf.static_lengths(cache)
    assert len(lengths) == text.num_hidden_layers and int(lengths[0]) == 3
    cache.update(keys[:, :, :1], values[:, :, :1], 0)
    assert hf.static_lengths(cache)[0] is lengths[0] and int(lengths[0]) == 4, f"{VERSION}: not advanced in place"
    torch.testing.assert_close(cache.layers[0].keys[:, :, 3], keys[:, :, 0])  # written at the old length
    cache.reset()
    assert hf.static_lengths(cache)[0] is lengths[0] and int(lengths[0]) == 0, f"{VERSION}: reset replaced it"


def test_image_features_arrive_as_per_image_pooler_outputs(tiny):
    """``get_image_features(...).pooler_output`` is one (tokens, D) tensor per image, and what the loop
    reads (5.24: HF's own encoding, ``mm_encoder_outputs``) is the same embeddings."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    with torch.no_grad():
        pooled = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    tokens = (batch["image_grid_thw"].prod(1) // 4).tolist()
    assert [tuple(p.shape) for p in pooled] == [(n, model.config.text_config.hidden_size) for n in tokens]
    seen = loop_call(model, **batch)
    feats = hf.visual_features(model, seen, "image")
    torch.testing.assert_close(feats, torch.cat(pooled))


def test_continuation_positions_come_from_the_kept_rope_deltas(tiny):
    """HF keeps the rope deltas of the last prompt on ``model.model.rope_deltas`` and hands a continued
    conversation positions ``text + delta``; they must equal M-RoPE over the whole conversation."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, hf.OUTPUT_CACHE)
    assert isinstance(cache, DynamicCache), f"{VERSION}: generate's output has no {hf.OUTPUT_CACHE}"
    _, deltas = hf.rope_index(model, batch["input_ids"], batch["mm_token_type_ids"],
                              image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    assert torch.equal(hf.rope_deltas(model), deltas), f"{VERSION}: rope deltas not kept on model.model"
    whole = torch.cat([out.sequences, torch.full((3, 2), 20)], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones(3, whole.shape[1] - batch["input_ids"].shape[1],
                                                          dtype=torch.long)], 1)
    seen = loop_call(model, input_ids=whole, attention_mask=mask, **{hf.OUTPUT_CACHE: cache})
    want, _ = hf.rope_index(model, whole, (whole == ids.image_pad).long(), image_grid_thw=batch["image_grid_thw"],
                            attention_mask=mask)
    got = inputs.mrope(seen["position_ids"])
    held = cache.get_seq_length()
    assert torch.equal(got[..., held:], want[..., held:]), f"{VERSION}: continuation positions moved"


def test_decode_refuses_keywords_it_does_not_know(tiny):
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS[:1], seed=1)
    seen = loop_call(model, **batch)
    seen.pop("generation_config")
    with pytest.raises(NotImplementedError, match="new_thing reached the decoding loop"):
        inputs.take_prompt(model, seen.pop("input_ids"), {**seen, "new_thing": 1})


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside the exporters
def test_exporters_record_generate_through_forward_and_a_patched_model_refuses(tiny):
    """transformers' exporters capture prefill and decode by wrapping ``model.forward`` during generate (what
    hf_compat.exporting detects). A patched model refuses, naming torch.export, rather than let them
    export a plain forward run by a token-by-token loop that never writes a latent."""
    from transformers.exporters.utils import decompose_prefill_decode

    import gapkern

    model, ids = tiny
    batch = tiny_prompts(ids, ROWS[:1], seed=1)
    stages = decompose_prefill_decode(model, dict(batch))
    assert set(stages) == {"prefill", "decode"}, f"{VERSION}: the exporters no longer capture forward() calls"
    gapkern.patch(model, None, ids.gap_config())
    try:
        with pytest.raises(RuntimeError) as failed:
            decompose_prefill_decode(model, dict(batch))
    finally:
        gapkern.unpatch(model)
    cause = failed.value.__cause__
    assert isinstance(cause, NotImplementedError) and "torch.export (transformers.exporters)" in str(cause), (
        f"{VERSION}: the exporters reach generate another way; gapkern.models.qwen2_5_vl.hf_compat.exporting "
        f"must follow ({failed.value!r}, caused by {cause!r})")


def test_compile_criteria_are_read_from_generate(tiny):
    """``compile_config`` is honoured where HF's own criteria say generate compiles: a static cache, on a
    device HF compiles for (the CPU only with CompileConfig._compile_all_devices), not ``disable_compile``."""
    model, _ = tiny
    config = transformers.GenerationConfig(compile_config=transformers.CompileConfig(backend="eager"))
    static, dynamic = StaticCache(config=model.config, max_cache_len=8), DynamicCache(config=model.config)
    assert not hf.compiles(model, config, static)  # on the CPU
    config.compile_config._compile_all_devices = True
    assert hf.compiles(model, config, static) and not hf.compiles(model, config, dynamic)
    config.disable_compile = True
    assert not hf.compiles(model, config, static)


# ---- Qwen2.5-VL's module layout, the prebuilt mask, the registry ----------------------------------------------

def test_module_names_training_selects_by_are_the_language_model_and_the_tower(tiny):
    """LoRA targets and freezing go by ``hf.LANGUAGE_MODEL`` / ``hf.VISION_TOWER``: every parameter is under one
    of them (or the LM head), and LoRA's pattern picks the language model's seven projections per layer, none of
    the tower's."""
    from gapkern.train.trainer import LORA_TARGETS

    model, _ = tiny
    names = {n for n, _ in model.named_parameters()}
    lm = {hf.LANGUAGE_MODEL + n for n, _ in hf.language_model(model).named_parameters()}
    tower = {hf.VISION_TOWER + n for n, _ in hf.vision_tower(model).named_parameters()}
    assert lm and tower and lm | tower <= names, f"{VERSION}: the module layout moved"
    assert names - lm - tower <= {"lm_head.weight"}, f"{VERSION}: parameters outside both: {names - lm - tower}"
    picked = [n for n, _ in model.named_modules() if re.fullmatch(LORA_TARGETS, n)]
    assert len(picked) == 7 * model.config.text_config.num_hidden_layers
    assert all(n.startswith(hf.LANGUAGE_MODEL) for n in picked)


def test_final_norm_takes_the_last_layers_state_and_gives_the_last_hidden_state(tiny):
    """The diagnosis hooks ``hf.final_norm``'s input as the last layer's output (before the final norm)."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS[:1], seed=1)
    seen = {}
    hook = hf.final_norm(model).register_forward_pre_hook(lambda module, args: seen.setdefault("in", args[0]))
    try:
        with torch.no_grad():
            out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(hf.final_norm(model)(seen["in"]), out.last_hidden_state, rtol=0, atol=0)


def test_rope_index_gives_the_positions_generate_hands_the_loop(tiny):
    """Training and the reference build M-RoPE with ``hf.rope_index``: the positions HF's generate computes for
    the same padded prompts with images, and the deltas it keeps on ``model.model`` for a continuation."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    pos, deltas = hf.rope_index(model, batch["input_ids"], batch["mm_token_type_ids"],
                                image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    seen = loop_call(model, **batch)
    given = inputs.mrope(seen["position_ids"])
    valid = batch["attention_mask"].bool().expand(3, -1, -1)
    assert pos.shape == given.shape and torch.equal(pos[valid], given[valid]), f"{VERSION}: M-RoPE positions moved"
    assert torch.equal(hf.rope_deltas(model), deltas)


def test_rope_deltas_are_set_back_and_a_missing_attribute_is_named():
    model, _ = tiny_qwen2_5_vl(seed=0)
    kept = torch.tensor([[3]])
    hf.set_rope_deltas(model, kept)
    assert model.model.rope_deltas is kept and hf.rope_deltas(model) is kept
    bare = torch.nn.Module()
    bare.model = torch.nn.Module()
    with pytest.raises(RuntimeError, match=r"rope_deltas is gone"):
        hf.set_rope_deltas(bare, kept)
    assert "rope_deltas" not in bare.model.__dict__  # nothing set silently


def test_image_features_read_only_the_vision_tower(tiny):
    """The vision-only loader runs ``Qwen2_5_VLModel.get_image_features`` on a module holding only ``.visual``:
    the same merger outputs as the whole model's."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS, seed=1)
    owner = torch.nn.Module()
    owner.visual = hf.vision_tower(model)
    with torch.no_grad():
        got = hf.tower_image_features(owner, batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        want = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    assert len(got) == len(want) == batch["image_grid_thw"].shape[0], VERSION
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_new_vision_tower_is_the_models_tower(tiny):
    """``hf.new_vision_tower`` builds the class the model holds (same tensors, same outputs), with sdpa."""
    model, ids = tiny
    batch = tiny_prompts(ids, ROWS[1:2], seed=1)
    own = hf.vision_tower(model)
    tower = hf.new_vision_tower(copy.deepcopy(model.config.vision_config))
    assert type(tower) is type(own) and tower.config._attn_implementation == "sdpa", VERSION
    assert {k: v.shape for k, v in tower.state_dict().items()} == {k: v.shape for k, v in own.state_dict().items()}
    tower.load_state_dict(own.state_dict())
    owner = torch.nn.Module()
    owner.visual = tower.eval()
    with torch.no_grad():
        got = hf.tower_image_features(owner, batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        want = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_language_model_takes_a_prebuilt_full_attention_mask_as_is(attention):
    """The static decode step hands the language model ``{"full_attention": mask}`` over its whole static cache
    (graph-safe: no mask built per step). It must attend as the 2-D padding mask on a dynamic cache does, and
    the mapping must be used, not rebuilt: unmasking the padding changes the output."""
    model, ids = tiny_qwen2_5_vl(seed=0, attn_implementation=attention)
    lm, embed = hf.language_model(model), model.get_input_embeddings()
    batch = tiny_prompts(ids, ROWS, seed=1)  # left-padded rows
    mask, length = batch["attention_mask"], batch["input_ids"].shape[1]
    pos, _ = hf.rope_index(model, batch["input_ids"], batch["mm_token_type_ids"],
                           image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    step = torch.randn(mask.shape[0], 1, model.config.text_config.hidden_size,
                       generator=torch.Generator().manual_seed(3))
    step_pos = pos[..., -1:] + 1
    valid = torch.zeros(mask.shape[0], length + 5, dtype=torch.bool)
    valid[:, :length + 1] = torch.cat([mask.bool(), torch.ones(mask.shape[0], 1, dtype=torch.bool)], 1)

    def decode_step(cache, step_mask):
        with torch.no_grad():
            lm(inputs_embeds=embed(batch["input_ids"]), attention_mask=mask, position_ids=pos, use_cache=True,
               **{hf.CACHE_KEYWORD: cache})
            return lm(inputs_embeds=step, attention_mask=step_mask, position_ids=step_pos, use_cache=True,
                      **{hf.CACHE_KEYWORD: cache}).last_hidden_state

    want = decode_step(DynamicCache(config=model.config), valid[:, :length + 1].long())
    got = decode_step(StaticCache(config=model.config, max_cache_len=length + 5),
                      hf.prebuilt_mask(attention, valid, step.dtype))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{VERSION}: the prebuilt mask is not taken")
    unmasked = decode_step(StaticCache(config=model.config, max_cache_len=length + 5),
                           hf.prebuilt_mask(attention, valid | (torch.arange(length + 5) < length), step.dtype))
    assert not torch.allclose(unmasked, want, rtol=1e-3, atol=1e-3), f"{VERSION}: the mapping's mask was ignored"


def test_the_gap_class_reads_and_writes_the_base_checkpoint_layout():
    """The one registry write: transformers' key renaming for Qwen2.5-VL, registered for the Gap class by name
    (transformers skips it for classes it does not know), and the base class's entry left as it was."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers import conversion_mapping as cm

    from gapkern.models import GapQwen2_5_VLForConditionalGeneration

    base = cm.get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__)
    gap = cm.get_checkpoint_conversion_mapping(GapQwen2_5_VLForConditionalGeneration.__name__)
    assert repr(gap) == repr(base), f"{VERSION}: the Gap class's checkpoint layout is not the base class's"
    hf.register_checkpoint_layout(GapQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    assert repr(cm.get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__)) == repr(base)


# ---- the image processor ---------------------------------------------------------------------------------------
# gapkern.models.prompt rebuilds Qwen2-VL's image processing with torch (images and crops already in memory go
# straight to pixel_values; the full Qwen2.5-VL processor would need torchvision for its video part). These pin
# it to transformers' own Qwen2VLImageProcessorPil: the same pixel_values and grid, from the same
# preprocessor_config.json.

@pytest.mark.parametrize("size", [(70, 90), (300, 517), (28, 28), (1000, 40), (13, 2000)])
def test_image_pixels_match_transformers_image_processor(tmp_path, size):
    import numpy as np
    from PIL import Image
    from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessorPil

    from gapkern.data import image_inputs
    from gapkern.models.prompt import image_settings

    vision = Qwen2_5_VLConfig().vision_config
    processor = Qwen2VLImageProcessorPil(min_pixels=64 * 28 * 28, max_pixels=300 * 28 * 28, image_mean=[0.5, 0.4, 0.3],
                                         image_std=[0.2, 0.25, 0.3], patch_size=vision.patch_size,
                                         merge_size=vision.spatial_merge_size,
                                         temporal_patch_size=vision.temporal_patch_size)
    processor.save_pretrained(tmp_path)  # a checkpoint's preprocessor_config.json, as transformers writes it
    settings = image_settings(str(tmp_path))
    h, w = size
    path = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(h * w).random((h, w, 3)) * 255).astype("uint8")).save(path)
    box = [w // 7, h // 5, w - w // 9, h - h // 11]
    with Image.open(path) as img:
        whole, crop = img.convert("RGB"), img.convert("RGB").crop(tuple(box))
    for got, image in ((image_inputs(str(path), vision, settings=settings), whole),
                       (image_inputs(str(path), vision, box=box, settings=settings), crop)):
        want = processor(images=[image], return_tensors="pt")
        assert torch.equal(got["image_grid_thw"], want["image_grid_thw"]), VERSION
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6, msg=VERSION)


def test_a_save_reverts_the_weight_conversions_the_model_carries(tiny):
    """``hf_compat.default_weight_mapping`` (the ZeRO-3 save of gapkern train) relies on transformers' save reading
    the load's renamings from ``model._weight_conversions`` and falling back to the default mapping when it is None
    (transformers/core_model_loading.py, ``revert_weight_conversion``: ``getattr(model, "_weight_conversions",
    None)``, line 1808 in 5.17, 2029 in 5.25); the attribute is cleared inside the block and restored after."""
    import inspect

    from transformers import core_model_loading

    from gapkern.models.qwen2_5_vl import hf_compat as hf

    source = inspect.getsource(core_model_loading.revert_weight_conversion)
    assert 'getattr(model, "_weight_conversions", None)' in source and "if weight_conversions is None" in source
    model = tiny[0]
    marker = ["a load's renamings"]
    model._weight_conversions = marker
    try:
        with hf.default_weight_mapping(model):
            assert model._weight_conversions is None
        assert model._weight_conversions is marker
        with pytest.raises(RuntimeError), hf.default_weight_mapping(model):
            raise RuntimeError("a failed save")
        assert model._weight_conversions is marker
    finally:
        del model._weight_conversions
