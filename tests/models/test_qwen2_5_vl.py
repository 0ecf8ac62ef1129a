"""Patching a loaded Qwen2.5-VL: per instance, exactly undone; the Gap class's checkpoint; latent tokens."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessorList, Qwen2_5_VLForConditionalGeneration
from transformers.generation import GenerationMixin

import gapkern
from gapkern.models import GapQwen2_5_VLForConditionalGeneration, add_latent_tokens, is_patched
from gapkern.testing import ForceTokens, tiny_head, tiny_prompts, tiny_qwen2_5_vl
from gapkern.models.qwen2_5_vl import CheckpointError
from gapkern.testing import TinyIds

from stages import checkpoint

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
    # in the order the profile's own code adds them (SPEC section 3; Monet's src/main.py lines 64-68: pad first)
    want = {"gap": (128, 129, 130), "monet": (129, 130, 128)}[profile]
    assert (cfg.latent_start_id, cfg.latent_end_id, cfg.latent_pad_id) == want
    assert cfg.profile == profile and cfg.latent_budget == 2
    assert len(tokenizer) == 133
    assert model.get_input_embeddings().num_embeddings == 133 and model.lm_head.out_features == 133
    start = gapkern.config.PROFILES[profile][0]
    assert tokenizer.convert_ids_to_tokens(tokenizer(f"w5 {start} w7")["input_ids"]) == ["w5", start, "w7"]
    assert add_latent_tokens(tokenizer, model, profile=profile) .latent_start_id == want[0]  # idempotent
    assert len(tokenizer) == 133
    gapkern.patch(model, None, cfg)
    batch = tiny_prompts(ids, ROWS[:1])
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("profile,layout,budget", [(None, "gap", 16), ("monet", "monet", 10)])
def test_attach_gap_gives_a_plain_model_the_profiles_layout_and_k(profile, layout, budget):
    """train's attach_gap without latent_budget: the profile's K (it was 16 for every profile)."""
    from gapkern.train import attach_gap

    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    cfg = attach_gap(model, word_tokenizer(ids.vocab_size), None, profile=profile)
    assert (cfg.profile, cfg.span_layout, cfg.latent_budget) == (profile or "gap", layout, budget)
    assert model.gap.config == cfg


# ---- a checkpoint's GAP parts are checked when loaded -------------------------------------------------------


@pytest.fixture(scope="module")
def gap_saved(tmp_path_factory):
    """A saved Gap model (PCA head, K=2, ema target 5.0) and its ids."""
    return checkpoint(tmp_path_factory.mktemp("gap"), gap_budget=2, calibration="ema", tau_ema=5.0), TinyIds()


def edited_copy(src, dst, config=None, tensors=None):
    """A copy of checkpoint ``src`` with ``config(dict)`` / ``tensors(dict)`` applied in place."""
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        weights = load_file(dst / "model.safetensors")
        tensors(weights)
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def drop_gap_tensors(weights, keep=()):
    for key in [k for k in weights if k.startswith("gap.") and k not in keep]:
        del weights[key]


def test_load_without_the_gap_tensors_is_an_error_naming_them_and_the_folder(tmp_path, gap_saved):
    """It loaded uninitialised memory into the head and tau_ema, and generated from it."""
    path = edited_copy(gap_saved[0], tmp_path / "ckpt", tensors=drop_gap_tensors)
    with pytest.raises(CheckpointError) as err:
        GapQwen2_5_VLForConditionalGeneration.from_pretrained(path)
    for word in (str(path), "gap.head.weight", "gap.head.basis", "gap.head.sigma"):
        assert word in str(err.value), word


def test_load_with_a_gap_tensor_of_another_shape_is_an_error_even_when_mismatches_are_allowed(tmp_path, gap_saved):
    """ignore_mismatched_sizes=True re-initialises a mismatched tensor: uninitialised memory again."""
    path = edited_copy(gap_saved[0], tmp_path / "ckpt", tensors=lambda w: w.update({"gap.head.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="gap.head.bias"):
        GapQwen2_5_VLForConditionalGeneration.from_pretrained(path, ignore_mismatched_sizes=True)


def test_span_layout_is_saved_and_an_old_config_loads_the_profiles(tmp_path):
    """GapConfig.span_layout goes into config.json's gap entry; one written before the field existed loads
    with the profile's layout (and K, when it has none either)."""
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    model.set_gap(None, ids.gap_config(profile="monet", span_layout="gap"))
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["gap"]
    assert (saved["span_layout"], saved["latent_budget"]) == ("gap", 10)
    loaded = GapQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert loaded.gap.config == model.gap.config

    def old(data):
        del data["gap"]["span_layout"], data["gap"]["latent_budget"]

    path = edited_copy(tmp_path / "saved", tmp_path / "old", config=old)
    loaded = GapQwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert (loaded.gap.config.span_layout, loaded.gap.config.latent_budget) == ("monet", 10)


def test_load_without_tau_ema_starts_with_no_target(tmp_path, gap_saved):
    """Only the running target missing (a gap entry written by hand): a clean state, 0 = nothing observed."""
    path = edited_copy(gap_saved[0], tmp_path / "ckpt", tensors=lambda w: w.pop("gap.tau_ema"))
    model, info = GapQwen2_5_VLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert "gap.tau_ema" in info["missing_keys"]
    assert model.gap.tau_ema.tolist() == [0.0] and model.gap.tau_ema.dtype == torch.float32
    assert model.gap.head.sigma is not None and bool((model.gap.head.sigma > 0).all())


@pytest.mark.parametrize("case,edit,words", [
    ("ids-outside-vocab", lambda c: c["gap"].update(latent_start_id=500), ["latent_start_id=500", "vocabulary"]),
    ("misspelt-key", lambda c: c["gap"].update(latent_budjet=4), ["'latent_budjet'", "latent_budget"]),
    ("wrong-type", lambda c: c["gap"].update(latent_budget="4"), ["latent_budget: expected an int"]),
    ("not-a-dict", lambda c: c.update(gap=[1, 2]), ["expected a dict"]),
    ("bad-head-rank", lambda c: c["gap"].update(head={"rank": 0, "whitened": True}), ["head: rank"]),
])
def test_load_checks_the_gap_entry_of_config_json(tmp_path, gap_saved, case, edit, words):
    """Ids outside the vocabulary loaded, and spans never opened; a misspelt key was dropped silently."""
    path = edited_copy(gap_saved[0], tmp_path / "ckpt", config=edit)
    with pytest.raises(CheckpointError) as err:
        GapQwen2_5_VLForConditionalGeneration.from_pretrained(path)
    for word in [str(path), "config.json 'gap'", *words]:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("tensor,value,words", [
    ("gap.head.sigma", 0.0, ["sigma", "positive"]),
    ("gap.head.weight", float("nan"), ["weight", "finite"]),
    ("gap.tau_ema", -1.0, ["tau_ema", "non-negative"]),
])
def test_load_checks_the_values_of_the_gap_tensors(tmp_path, gap_saved, tensor, value, words):
    path = edited_copy(gap_saved[0], tmp_path / "ckpt", tensors=lambda w: w[tensor].view(-1).__setitem__(0, value))
    with pytest.raises(CheckpointError) as err:
        GapQwen2_5_VLForConditionalGeneration.from_pretrained(path)
    for word in [str(path), *words]:
        assert word in str(err.value), (word, str(err.value))


def test_plain_class_loads_a_gap_checkpoint_and_patch_reads_its_config(gap_saved):
    """model.config.gap holds the GapConfig fields and "head": patch(model) separates them."""
    path, ids = gap_saved
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    assert model.config.gap["head"] == {"rank": 8, "whitened": True}
    gapkern.patch(model, tiny_head(model))
    assert model.gap.config == ids.gap_config(latent_budget=2, calibration="ema")
    gapkern.unpatch(model)


def test_the_gap_config_of_a_patched_model_cannot_be_changed_in_place():
    """latent_budget set to -3 after patching made generate emit pads forever."""
    model, ids = tiny_qwen2_5_vl(seed=0)
    gapkern.patch(model, None, ids.gap_config(latent_budget=2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.gap.config.latent_budget = -3
    with pytest.raises(TypeError, match="config: expected a gapkern.GapConfig"):
        model.gap.config = {"latent_budget": 3}
    with pytest.raises(ValueError, match="latent_start_id=1000 is outside the vocabulary"):
        model.gap.config = dataclasses.replace(model.gap.config, latent_start_id=1000)
    model.gap.config = dataclasses.replace(model.gap.config, latent_budget=3)
    assert model.gap.config.latent_budget == 3
    gapkern.unpatch(model)


def test_save_writes_the_state_the_model_has_now(tmp_path):
    """A config replaced after patching is what config.json gets, not the one of patch time."""
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    model.set_gap(tiny_head(model), ids.gap_config(latent_budget=2))
    model.gap.config = dataclasses.replace(model.gap.config, latent_budget=5, calibration="rms")
    model.save_pretrained(tmp_path)
    loaded = GapQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.gap.config == model.gap.config


# ---- save_pretrained writes config.json and the weights, or neither ----------------------------------------


def folder_bytes(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def failing_weight_write(monkeypatch):
    """The weight write fails half-way, after config.json was written (transformers writes it first)."""
    import transformers.modeling_utils as mu

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(mu, "safe_save_file", broken)


@pytest.mark.parametrize("how", ["gap-class", "patched"])
def test_save_whose_weight_write_fails_leaves_the_folder_unchanged(tmp_path, monkeypatch, how):
    """It left a new config.json (K=3) beside the old weights."""
    cls = GapQwen2_5_VLForConditionalGeneration if how == "gap-class" else None
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=cls)
    if how == "gap-class":
        model.set_gap(tiny_head(model), ids.gap_config(latent_budget=2))
    else:
        gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=2))
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    before = folder_bytes(path)
    model.set_gap(None, ids.gap_config(latent_budget=3)) if how == "gap-class" else gapkern.patch(
        model, None, ids.gap_config(latent_budget=3))
    failing_weight_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert folder_bytes(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temporary folder left behind"
    monkeypatch.undo()
    model.save_pretrained(path)
    loaded = GapQwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert loaded.gap.config.latent_budget == 3 and loaded.gap.head is None


def test_save_over_a_sharded_checkpoint_replaces_its_shards(tmp_path):
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    model.set_gap(tiny_head(model), ids.gap_config(latent_budget=2))
    path = tmp_path / "ckpt"
    model.save_pretrained(path, max_shard_size="200KB")
    assert any("-of-" in p.name for p in path.iterdir()) and (path / "model.safetensors.index.json").exists()
    (path / "notes.txt").write_text("mine")
    model.save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    loaded = GapQwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
