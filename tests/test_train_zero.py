"""DeepSpeed ZeRO-1/2/3 through ``gapkern train`` on 2 CPU ranks (gloo) give the DDP run's model.

The README's recipes, run as written: ``-- --deepspeed examples/ds_zero{1,2,3}.json`` with the latent loss on.
Tolerance: logged losses within 1e-5 and every saved weight within 1e-5 (absolute) of DDP's; what the engines
differ by is float32 summation order (seen: 2e-6 and 1e-6). ZeRO-2 was 2.5e-2 / 5.6e-3 apart before the latent
loss reached the head in the same order on every rank (tests/test_train_forward.py, the hook-order test).
Needs the optional extra ``deepspeed`` (CI's latest leg installs it); each run is a few seconds of training and
~30 s of start-up on this machine.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from gapkern.cli import main
from stages import torchrun
from train_data import make_checkpoint, make_data

pytest.importorskip("deepspeed", reason="the optional extra gapkern[deepspeed]")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP and ZeRO-1/2/3 runs of 4 steps (a checkpoint at step 2), 2 ranks each, and ZeRO-3 resumed at step 2."""
    folder = tmp_path_factory.mktemp("zero")
    base, head = make_checkpoint(folder)
    data, _, _ = make_data(folder, base, n=8, g=2)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def train(name, *extra, trainer=(), steps=STEPS):
        out = str(folder / name)
        done = torchrun("train", "--model", base, "--data", data, "--head", head, "--out", out, "--lr", "1e-3",
                        "--batch", "2", "--max-steps", str(steps), "--logging-steps", "1", "--save-steps", "2", "--keep-checkpoints", "2",
                        *extra, "--", "--lr_scheduler_type", "constant", *trainer, timeout=900)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        return out

    outs = {"ddp": train("ddp")}
    for stage in (1, 2, 3):
        outs[f"zero{stage}"] = train(f"zero{stage}", trainer=("--deepspeed",
                                     os.path.join(ROOT, "examples", f"ds_zero{stage}.json")))
    outs["resumed"] = train("resumed", "--resume", os.path.join(outs["zero3"], "checkpoint-2"),
                            trainer=("--deepspeed", os.path.join(ROOT, "examples", "ds_zero3.json")))
    return outs


def logged(out) -> list[dict]:
    with open(os.path.join(out, "trainer_state.json")) as f:
        return [e for e in json.load(f)["log_history"] if "loss" in e]


def weights(out) -> dict:
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3"])
def test_zero_gives_the_ddp_model(runs, engine):
    want, got = logged(runs["ddp"]), logged(runs[engine])
    assert [e["step"] for e in got] == [e["step"] for e in want] == list(range(1, STEPS + 1))
    assert any(e["latent_loss"] > 0 for e in want)
    for w, g in zip(want, got):
        for key in ("loss", "text_loss", "latent_loss"):
            assert abs(g[key] - w[key]) <= TOLERANCE, (engine, w["step"], key, g[key], w[key])
    ddp, zero = weights(runs["ddp"]), weights(runs[engine])
    assert set(zero) == set(ddp)  # the same consolidated file, in the same (hub) layout
    start = weights(os.path.join(os.path.dirname(runs["ddp"]), "base"))
    for key in ddp:
        assert (zero[key].float() - ddp[key].float()).abs().max() <= TOLERANCE, (engine, key)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(zero[key], start[key])  # trained
    with safe_open(os.path.join(os.path.dirname(runs["ddp"]), "head.safetensors"), "pt") as f:
        assert not torch.equal(zero["gap.head.weight"], f.get_tensor("weight"))  # the head trained too


def test_zero3_resumes_where_it_stopped(runs):
    """Resumed from ZeRO-3's step-2 checkpoint (its partitioned optimizer state): steps 3 and 4 as uninterrupted."""
    whole, resumed = logged(runs["zero3"]), logged(runs["resumed"])
    assert [e["step"] for e in resumed][-2:] == [3, 4]
    for w, g in zip(whole[2:], resumed[-2:]):
        for key in ("loss", "text_loss", "latent_loss"):
            assert abs(g[key] - w[key]) <= 1e-6, (w["step"], key)
    a, b = weights(runs["zero3"]), weights(runs["resumed"])
    assert all((a[k].float() - b[k].float()).abs().max() <= 1e-6 for k in a)


def test_zero3_checkpoint_loads_in_generate(runs, capsys):
    for out in (runs["zero3"], os.path.join(runs["zero3"], "checkpoint-2")):
        assert main(["generate", "--model", out, "--max-new-tokens", "6", "--span-at", "1"]) == 0
        assert "<latent> <latent_pad>x4" in capsys.readouterr().out
