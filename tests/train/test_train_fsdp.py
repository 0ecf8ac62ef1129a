"""FSDP units of a Gap Qwen2.5-VL (gapkern.train.fsdp): which modules shard as one, and that the training forward
runs through them.

The CPU tests check the policy and run torch's FSDP2 (``fully_shard``) with one gloo rank: parameters become
DTensors managed per unit as on GPUs, which is what broke the latent loss while it read ``head.weight`` outside
the head's forward ("got mixed torch.Tensor and DTensor"). accelerate refuses FSDP on CPU ranks and so does
``gapkern train`` (tests/train/test_train_cli.py); the run through ``gapkern train -- --fsdp`` is the GPU test here
(and ``scripts/validate_cuda.sh fsdp``).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from transformers import TrainingArguments

from gapkern.models import GapQwen2_5_VLForConditionalGeneration
from gapkern.testing import tiny_head, tiny_qwen2_5_vl
from gapkern.train import fsdp_units, use_gap_wrap, wrap_classes
from test_train_forward import _batch, _targets

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
UNITS = ["", "model.visual.blocks.0", "model.language_model.layers.0", "model.language_model.layers.1", "gap.head"]


@pytest.fixture
def gap_model():
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    model.set_gap(tiny_head(model, rank=8), ids.gap_config(latent_budget=K))
    return model, ids


def owner(units, name):
    """The unit a parameter or buffer ``name`` belongs to: the longest unit name that prefixes it."""
    return max((u for u in units if u == "" or name.startswith(u + ".")), key=len)


def test_units_are_the_layers_the_vision_blocks_and_the_head(gap_model):
    model, _ = gap_model
    assert wrap_classes(model) == ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "PCALatentHead"]
    units = fsdp_units(model)
    assert units == UNITS
    buffers = dict(model.named_buffers())
    assert owner(units, "gap.head.weight") == owner(units, "gap.head.bias") == "gap.head"
    assert all(owner(units, f"gap.head.{b}") == "gap.head" for b in ("basis", "mean", "sigma"))
    assert "gap.tau_ema" in buffers and owner(units, "gap.tau_ema") == ""  # a buffer: whole on every rank
    for name in ("lm_head.weight", "model.language_model.embed_tokens.weight", "model.language_model.norm.weight"):
        assert owner(units, name) == "", name
    params = [name for name, _ in model.named_parameters()]
    assert all(owner(units, n) == "" or n.startswith(tuple(u + "." for u in units[1:])) for n in params)


def test_output_as_input_has_no_head_unit():
    model, ids = tiny_qwen2_5_vl(seed=0, model_class=GapQwen2_5_VLForConditionalGeneration)
    model.set_gap(None, ids.gap_config(latent_budget=K))
    assert "PCALatentHead" not in wrap_classes(model) and "gap.head" not in fsdp_units(model)


@pytest.mark.parametrize("config, want", [
    ({}, ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "PCALatentHead"]),
    ({"transformer_layer_cls_to_wrap": ["Qwen2_5_VLDecoderLayer"]}, ["Qwen2_5_VLDecoderLayer"]),  # the user's own
])
def test_the_units_reach_accelerates_wrap_policy(gap_model, tmp_path, config, want):
    """``use_gap_wrap`` on the Trainer's arguments (what ``gapkern train`` does before the Trainer is built), then
    accelerate's own FSDP2 policy selects them (accelerate 1.16, accelerate/utils/fsdp_utils.py:940,
    fsdp2_prepare_auto_wrap_policy)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model, _ = gap_model
    args = TrainingArguments(str(tmp_path), fsdp="full_shard auto_wrap", fsdp_config=dict(config), use_cpu=True,
                             report_to="none")
    set_now = use_gap_wrap(args, model)
    assert set_now == (None if config else want)
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == want
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(**args.fsdp_plugin_args), model)
    assert [""] + [name for name, module in model.named_modules() if name and policy(module)] == fsdp_units(model, want)


def test_no_fsdp_leaves_the_arguments_alone(gap_model, tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    assert use_gap_wrap(args, gap_model[0]) is None and not args.fsdp


def test_fully_sharded_training_step_matches_the_plain_model(gap_model, tmp_path):
    """FSDP2 over the units (inner units first, then the root, as accelerate applies them), one gloo rank:
    the loss, its parts and every gradient equal the unwrapped model's (seen: bit-identical, one rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, ids = gap_model
    model.train()
    plain = copy.deepcopy(model)
    batch = _batch(ids)
    targets = _targets(model, batch, ids)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        units = fsdp_units(model)
        for name in reversed(units[1:]):
            fully_shard(model.get_submodule(name), mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model.gap.head.weight, DTensor) and not isinstance(model.gap.tau_ema, DTensor)
        out = model(**batch, latent_targets=targets)
        out.loss.backward()
        want = plain(**batch, latent_targets=targets)
        want.loss.backward()
        for key in ("loss", "text_loss", "latent_loss"):
            torch.testing.assert_close(getattr(out, key), getattr(want, key), rtol=1e-6, atol=1e-6)
        assert out.latent_loss > 0
        sharded = dict(model.named_parameters())
        for name, param in plain.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(sharded[name].grad.full_tensor(), param.grad, rtol=1e-6, atol=1e-6,
                                           msg=name)
        assert sharded["gap.head.weight"].grad.full_tensor().abs().sum() > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_one_gpu_fsdp_run_gives_the_plain_run(tmp_path, capsys):
    """The README's FSDP recipe on one GPU (one rank, so the same model as without FSDP: what it proves is that
    the units wrap, train the head and save a checkpoint generate loads). Tolerance 1e-5 on logged losses and
    weights: one rank reduces nothing, both runs run the same kernels (not yet run: no GPU was lent)."""
    from safetensors import safe_open

    from gapkern.cli import main
    from stages import torchrun
    from train_data import make_checkpoint, make_data

    base, head = make_checkpoint(tmp_path)
    data, _, _ = make_data(tmp_path, base, n=8, g=2)

    def train(name, *trainer):
        out = str(tmp_path / name)
        done = torchrun("train", "--model", base, "--data", data, "--head", head, "--out", out, "--lr", "1e-3",
                        "--batch", "2", "--max-steps", "4", "--logging-steps", "1", "--save-steps", "2", "--",
                        "--lr_scheduler_type", "constant", *trainer, ranks=1, timeout=600)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        with open(os.path.join(out, "trainer_state.json")) as f:
            logs = [e for e in json.load(f)["log_history"] if "loss" in e]
        with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
            return out, logs, {k: f.get_tensor(k) for k in f.keys()}

    _, want, plain = train("plain")
    out, got, fsdp = train("fsdp", "--fsdp", "full_shard auto_wrap")
    assert [e["step"] for e in got] == [1, 2, 3, 4]
    saved = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
    assert "PCALatentHead" in saved.fsdp_config["transformer_layer_cls_to_wrap"]  # the Gap units were used
    for w, g in zip(want, got):
        for key in ("loss", "text_loss", "latent_loss"):
            assert abs(g[key] - w[key]) <= 1e-5, (w["step"], key)
    assert set(fsdp) == set(plain)
    assert all((fsdp[k].float() - plain[k].float()).abs().max() <= 1e-5 for k in plain)
    assert main(["generate", "--model", out, "--max-new-tokens", "6", "--span-at", "1"]) == 0
    assert "<latent> <latent_pad>x4" in capsys.readouterr().out
