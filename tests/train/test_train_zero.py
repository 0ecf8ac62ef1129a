"""DeepSpeed ZeRO-1/2/3 through ``gapkern train`` on 2 CPU ranks (gloo) give the DDP run's model.

The README's recipes, run as written: ``-- --deepspeed examples/ds_zero{1,2,3}.json`` with the latent loss on,
the Trainer's AdamW in every engine (the configs name no optimizer).
Tolerance: logged losses within 1e-5 of DDP's (seen: 4.8e-7 for every stage), every saved weight within 2e-5
(absolute; seen: 3.4e-7 for ZeRO-1/2, 6.4e-6 for ZeRO-3, one element of 8192 in an MLP weight: float32
summation order differs between the engines, and Adam's normalised step m / sqrt(v) turns a last-bit
difference in a near-zero gradient into up to lr = 1e-3 per step). ZeRO-2 was 2.5e-2 / 5.6e-3 apart before
the latent loss reached the head in the same order on every rank (tests/train/test_train_forward.py, the hook-order
test). A resume from ZeRO-3's partitioned step-2 checkpoint is bit-identical (seen: 0.0).
Needs the optional extra ``deepspeed`` (CI's latest leg installs it; ``pip install -e ".[test]"`` skips this
file). Five 2-rank runs of ~35 s each, almost all of it start-up (imports, DeepSpeed's set-up).
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors import safe_open

from gapkern.cli import main
from stages import torchrun
from train_data import make_checkpoint, make_data

if importlib.util.find_spec("deepspeed") is None:  # not imported here: that alone takes seconds
    pytest.skip("needs deepspeed, the optional extra gapkern[deepspeed]", allow_module_level=True)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 2e-5
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP and ZeRO-1/2/3 runs of 4 steps (a checkpoint at step 2), 2 CPU ranks each, and ZeRO-3 resumed at
    step 2. Returns {name: out folder}, with "stderr" the runs' own output."""
    folder = tmp_path_factory.mktemp("zero")
    base, head = make_checkpoint(folder)
    data, _, _ = make_data(folder, base, n=8, g=2)
    outs, said = {}, {}

    def train(name, *extra, config=None):
        out = str(folder / name)
        engine = ("--deepspeed", os.path.join(ROOT, "examples", config)) if config else ()
        done = torchrun("train", "--model", base, "--data", data, "--head", head, "--out", out, "--lr", "1e-3",
                        "--batch", "2", "--max-steps", str(STEPS), "--logging-steps", "1", "--save-steps", "2",
                        "--keep-checkpoints", "2", *extra, "--", "--lr_scheduler_type", "constant", *engine,
                        timeout=900)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        outs[name], said[name] = out, done.stdout + done.stderr

    # CPU ranks on any machine: DeepSpeed's CPU accelerator, torch seeing no GPU either
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        train("ddp")
        for stage in (1, 2, 3):
            train(f"zero{stage}", config=f"ds_zero{stage}.json")
        train("resumed", "--resume", os.path.join(outs["zero3"], "checkpoint-2"), config="ds_zero3.json")
    return {**outs, "stderr": said}


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
    assert all(e["latent_loss"] > 0 for e in want)  # every step's batch has latent lines: the head trains
    for w, g in zip(want, got):
        for key in ("loss", "text_loss", "latent_loss"):
            assert abs(g[key] - w[key]) <= LOSS_TOLERANCE, (engine, w["step"], key, g[key], w[key])
    ddp, zero = weights(runs["ddp"]), weights(runs[engine])
    assert set(zero) == set(ddp)  # the same consolidated file, in the same (hub) layout
    start = weights(os.path.join(os.path.dirname(runs["ddp"]), "base"))
    for key in ddp:
        assert (zero[key].float() - ddp[key].float()).abs().max() <= WEIGHT_TOLERANCE, (engine, key)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(zero[key], start[key])  # trained
    with safe_open(os.path.join(os.path.dirname(runs["ddp"]), "head.safetensors"), "pt") as f:
        assert not torch.equal(zero["gap.head.weight"], f.get_tensor("weight"))  # the head trained too


@pytest.mark.parametrize("engine, per_rank", [
    ("zero1", ["optim_states"]), ("zero2", ["optim_states"]), ("zero3", ["model_states", "optim_states"])])
def test_zero_checkpoints_hold_one_shard_per_rank(runs, engine, per_rank):
    """What each stage shards, as its checkpoint shows: ZeRO-1/2 the optimizer state (and, 2, the gradients,
    which are not saved), ZeRO-3 the parameters as well; the step folder also holds the whole model."""
    step = os.path.join(runs[engine], "checkpoint-2")
    files = set(os.listdir(os.path.join(step, "global_step2")))
    for kind in per_rank:
        assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}.pt" for r in (0, 1)} <= files, (engine, files)
    assert os.path.isfile(os.path.join(step, "model.safetensors"))
    assert "built successfully" not in runs["stderr"][engine]  # no DeepSpeed op compiled (CPU: none is needed)


def test_zero3_resumes_where_it_stopped(runs):
    """Resumed from ZeRO-3's step-2 checkpoint (its partitioned optimizer state): steps 3 and 4 as uninterrupted."""
    whole, resumed = logged(runs["zero3"]), logged(runs["resumed"])
    assert [e["step"] for e in resumed] == list(range(1, STEPS + 1))  # 1 and 2 from the checkpoint's state
    for w, g in zip(whole[2:], resumed[2:]):
        for key in ("loss", "text_loss", "latent_loss"):
            assert abs(g[key] - w[key]) <= 1e-6, (w["step"], key)
    a, b = weights(runs["zero3"]), weights(runs["resumed"])
    assert all((a[k].float() - b[k].float()).abs().max() <= 1e-6 for k in a)


def test_zero3_checkpoint_loads_in_generate(runs, capsys):
    for out in (runs["zero3"], os.path.join(runs["zero3"], "checkpoint-2")):
        assert main(["generate", "--model", out, "--max-new-tokens", "6", "--span-at", "1"]) == 0
        assert "<latent> <latent_pad>x4" in capsys.readouterr().out


def test_zero3_checkpoint_evaluates_as_the_ddp_one(runs, tmp_path, capsys):
    """``gapkern eval`` loads both final models; greedy answers through a latent span are the same."""
    samples = os.path.join(os.path.dirname(runs["ddp"]), "curated.jsonl")
    assert main(["eval", "--model", f"{runs['ddp']},{runs['zero3']}", "--names", "ddp,zero3", "--samples", samples,
                 "--out", str(tmp_path), "--max-new-tokens", "10", "--span-at", "1", "--batch", "4"]) == 0
    capsys.readouterr()

    def predictions(name):
        with open(tmp_path / name / "none" / "predictions.jsonl") as f:
            return [json.loads(line)["prediction"] for line in f]

    ddp = predictions("ddp")
    assert len(ddp) == 8 and all("</latent>" in p for p in ddp)
    assert predictions("zero3") == ddp
