"""Patching a loaded Qwen2.5-VL: per instance, exactly undone; the Gap class's checkpoint; latent tokens."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LogitsProcessorList, Qwen2_5_VLForConditionalGeneration
from transformers.generation import GenerationMixin

import gapkern
from gapkern.models import (ForceTokens, GapQwen2_5_VLForConditionalGeneration, add_latent_tokens, is_patched,
                            tiny_head, tiny_prompts, tiny_qwen2_5_vl)

ROWS = [(4, None), (2, (56, 56)), (3, (56, 84))]


pytestmark = pytest.mark.usefixtures("one_thread")


def spans(batch, ids):
    """Row 0 writes a span at once, row 2 one at step 3; the start token is banned elsewhere."""
    sched = {(0, 0): ids.latent_start, (2, 3): ids.latent_start}
    return LogitsProcessorList([ForceTokens(batch["input_ids"].shape[1], sched, banned=[ids.latent_start])])


def snapshot(model):
    return {
        "dict": set(model.__dict__),
        "modules": dict(model._modules),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "rope_deltas": model.model.rope_deltas,
    }


def test_patch_binds_per_instance_and_leaves_other_models_alone():
    model, ids = tiny_qwen2_5_vl(seed=0)
    other, _ = tiny_qwen2_5_vl(seed=0)
    batch = tiny_prompts(ids, ROWS)
    kw = dict(max_new_tokens=8, do_sample=False)
    before = other.generate(**batch, **kw)
    class_generate = Qwen2_5_VLForConditionalGeneration.generate

    assert gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=2)) is model
    assert is_patched(model) and "generate" in model.__dict__ and isinstance(model.gap, gapkern.models.GapState)
    assert Qwen2_5_VLForConditionalGeneration.generate is class_generate is GenerationMixin.generate
    assert not is_patched(other) and "generate" not in other.__dict__ and "gap" not in other._modules
    assert not hasattr(other.config, "gap")
    assert torch.equal(other.generate(**batch, **kw), before)
    out = model.generate(**batch, logits_processor=spans(batch, ids), return_dict_in_generate=True, **kw)
    assert [len(z) for z in out.latents] == [2, 0, 2]
    gapkern.unpatch(model)


def test_unpatch_restores_exactly():
    model, ids = tiny_qwen2_5_vl(seed=0)
    batch = tiny_prompts(ids, ROWS)
    kw = dict(max_new_tokens=8, do_sample=False)
    before = snapshot(model)
    ref = model.generate(**batch, **kw)
    after_hf = snapshot(model)  # HF's generate itself caches rope deltas on the model

    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=2, calibration="ema"))
    gapkern.patch(model, None, ids.gap_config(latent_budget=3))  # re-patching replaces
    assert model.gap.head is None and model.gap.config.latent_budget == 3
    model.generate(**batch, logits_processor=spans(batch, ids), **kw)
    assert gapkern.unpatch(model) is model
    gapkern.unpatch(model)  # a second unpatch is a no-op

    now = snapshot(model)
    assert now["dict"] == before["dict"] and now["modules"] == before["modules"]
    assert now["config"] == before["config"]
    assert now["state"].keys() == before["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in before["state"].items())
    assert now["rope_deltas"] is after_hf["rope_deltas"]
    assert type(model).generate is GenerationMixin.generate
    assert torch.equal(model.generate(**batch, **kw), ref)


def test_patch_rejects_wrong_inputs():
    model, ids = tiny_qwen2_5_vl(seed=0)
    with pytest.raises(TypeError, match="model"):
        gapkern.patch(torch.nn.Linear(2, 2), None, ids.gap_config())
    with pytest.raises(ValueError, match="config"):
        gapkern.patch(model)  # no GapConfig given, none in model.config
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gapkern.patch(model, None, ids.gap_config().__class__(1000, 3, 4))
    with pytest.raises(ValueError, match="hidden size"):
        gapkern.patch(model, gapkern.PCALatentHead(torch.eye(32, 4), torch.zeros(32)), ids.gap_config())
    assert not is_patched(model)


@pytest.mark.parametrize("whitened", [True, False])
def test_gap_model_save_load_round_trip(tmp_path, whitened):
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    cfg = ids.gap_config(latent_budget=2, calibration="ema", ema_decay=0.9)
    model.set_gap(tiny_head(model, whitened=whitened), cfg)
    batch = tiny_prompts(ids, ROWS)
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    model.generate(**batch, logits_processor=spans(batch, ids), **kw)  # sets the ema target
    assert model.gap.tau_ema.item() > 0

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # the hub layout of Qwen2.5-VL, plus gap.*
        keys = set(f.keys())
    assert {"gap.head.weight", "gap.head.basis", "gap.head.mean", "gap.tau_ema"} <= keys
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    saved = json.loads((tmp_path / "config.json").read_text())["gap"]
    assert saved["latent_budget"] == 2 and saved["head"] == {"rank": 8, "whitened": whitened}

    loaded = GapQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.gap.config == cfg
    assert (loaded.gap.head.sigma is not None) == whitened
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and any(k.startswith("gap.head.") for k in got)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert loaded.gap.tau_ema.dtype == torch.float32
    a = model.generate(**batch, logits_processor=spans(batch, ids), **kw)
    b = loaded.generate(**batch, logits_processor=spans(batch, ids), **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.latents, b.latents):
        assert torch.equal(x, y)


def test_patched_model_checkpoint_loads_as_gap_model(tmp_path):
    model, ids = tiny_qwen2_5_vl(seed=0)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=2))
    model.save_pretrained(tmp_path)
    loaded = GapQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = tiny_prompts(ids, ROWS)
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    a = model.generate(**batch, logits_processor=spans(batch, ids), **kw)
    b = loaded.generate(**batch, logits_processor=spans(batch, ids), **kw)
    assert torch.equal(a.sequences, b.sequences)
    # a plain Qwen2.5-VL checkpoint loads as a Gap model without GAP parts
    gapkern.unpatch(model)
    model.save_pretrained(tmp_path / "plain")
    plain = GapQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "plain")
    assert "gap" not in plain._modules
    want = model.state_dict()
    assert plain.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in plain.state_dict().items())
    with pytest.raises(RuntimeError, match="set_gap"):
        plain.generate(**batch, max_new_tokens=2)


def word_tokenizer(size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


@pytest.mark.parametrize("profile", ["gap", "monet"])
def test_add_latent_tokens_adds_profile_tokens_and_resizes(profile):
    model, ids = tiny_qwen2_5_vl(seed=0)
    tokenizer = word_tokenizer(ids.vocab_size)
    cfg = add_latent_tokens(tokenizer, model, profile=profile, latent_budget=2)
    assert (cfg.latent_start_id, cfg.latent_end_id, cfg.latent_pad_id) == (128, 129, 130)
    assert cfg.profile == profile and cfg.latent_budget == 2
    assert len(tokenizer) == 133
    assert model.get_input_embeddings().num_embeddings == 133 and model.lm_head.out_features == 133
    start = gapkern.config.PROFILES[profile][0]
    assert tokenizer.convert_ids_to_tokens(tokenizer(f"w5 {start} w7")["input_ids"]) == ["w5", start, "w7"]
    assert add_latent_tokens(tokenizer, model, profile=profile) .latent_start_id == 128  # idempotent
    assert len(tokenizer) == 133
    gapkern.patch(model, None, cfg)
    batch = tiny_prompts(ids, ROWS[:1])
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4)
