"""``gapkern train`` on a tiny model: from the command line, resume, DDP under torchrun, LoRA, freezing, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from gapkern.cli import main
from gapkern.head import PCALatentHead
from gapkern.models import GapQwen2_5_VLForConditionalGeneration
from train_data import make_checkpoint, make_data

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    base, head = make_checkpoint(folder)
    data, curated, _ = make_data(folder, base, n=8, g=2)
    return {"base": base, "head": head, "data": data, "curated": curated, "folder": folder}


def args(task, out, *more):
    return ["train", "--model", task["base"], "--data", task["data"], "--head", task["head"], "--out", str(out),
            "--lr", "1e-3", "--batch", "2", *more]


def logged(out) -> list[dict]:
    with open(os.path.join(out, "trainer_state.json")) as f:
        return [e for e in json.load(f)["log_history"] if "loss" in e]


def env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def weights(path) -> dict:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_train_from_the_command_line_lowers_the_loss_and_saves_a_gap_checkpoint(task, tmp_path, capsys):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "gapkern.cli", *args(task, out, "--max-steps", "40",
                                                                      "--logging-steps", "5", "--save-steps", "100")],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained      40 steps on 8 lines (4 with latents) x 1 process(es)" in done.stdout
    logs = logged(out)
    assert [e["step"] for e in logs] == list(range(5, 45, 5))
    for key, factor in (("loss", 0.75), ("text_loss", 0.8), ("latent_loss", 0.9)):
        first, last = (logs[0][key] + logs[1][key]) / 2, (logs[-1][key] + logs[-2][key]) / 2
        assert last < factor * first, (key, [e[key] for e in logs])
    for e in logs:  # the logged loss is the two parts, weighted 1
        assert e["loss"] == pytest.approx(e["text_loss"] + e["latent_loss"], rel=1e-4)

    model = GapQwen2_5_VLForConditionalGeneration.from_pretrained(str(out))
    assert model.gap.config.latent_budget == 4 and model.gap.config.profile == "gap"
    start = PCALatentHead.load(task["head"])
    assert torch.equal(model.gap.head.basis, start.basis) and not torch.equal(model.gap.head.weight, start.weight)
    base, trained = weights(task["base"]), weights(out)
    vision = [k for k in base if k.startswith("visual.")]
    assert vision and all(torch.equal(base[k], trained[k]) for k in vision)  # frozen by default
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"],
                           trained["model.layers.0.self_attn.q_proj.weight"])

    code = main(["generate", "--model", str(out), "--max-new-tokens", "6", "--span-at", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "<latent> <latent_pad>x4" in printed


def test_resume_reproduces_the_uninterrupted_losses(task, tmp_path):
    """Stopped after step 3 (with its checkpoint) and resumed to 6: the same six logged losses, to the bit."""
    constant = ["--", "--lr_scheduler_type", "constant"]  # a schedule that does not depend on max_steps
    common = ["--logging-steps", "1", "--save-steps", "3"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(args(task, whole, "--max-steps", "6", *common, *constant)) == 0
    assert main(args(task, parts, "--max-steps", "3", *common, *constant)) == 0
    assert main(args(task, parts, "--max-steps", "6", "--resume", *common, *constant)) == 0
    keys = ("step", "loss", "text_loss", "latent_loss")
    want = [tuple(e[k] for k in keys) for e in logged(whole)]
    got = [tuple(e[k] for k in keys) for e in logged(parts)]
    assert [w[0] for w in want] == [1, 2, 3, 4, 5, 6]
    assert got == want
    assert any(w[3] == 0 for w in want) and any(w[3] > 0 for w in want)  # batches with and without latent slots
    trained_whole, trained_parts = weights(whole), weights(parts)
    assert all(torch.equal(trained_whole[k], trained_parts[k]) for k in trained_whole)


def test_two_rank_ddp_on_cpu_lowers_the_loss(task, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "gapkern.cli", *args(task, out, "--max-steps", "20", "--logging-steps", "5",
                                          "--save-steps", "100")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained      20 steps on 8 lines (4 with latents) x 2 process(es)") == 1  # rank 0 reports
    logs = logged(out)
    assert logs[-1]["epoch"] == pytest.approx(10.0)  # 2 ranks x 2 rows x 20 steps over 8 lines
    assert logs[-1]["loss"] < 0.85 * logs[0]["loss"]
    assert logs[-1]["latent_loss"] < logs[0]["latent_loss"]


def test_lora_trains_adapters_and_saves_them_merged(task, tmp_path):
    out = tmp_path / "lora"
    assert main(args(task, out, "--max-steps", "3", "--lora", "4", "--lr", "1e-2", "--save-steps", "100")) == 0
    base, trained = weights(task["base"]), weights(out)
    assert not any("lora" in k for k in trained) and set(trained) - set(base) == {k for k in trained if "gap." in k}
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], trained[key])  # the adapter was merged into the base weight
    for name in ("model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        assert torch.equal(base[name], trained[name])  # no adapter there: frozen
    GapQwen2_5_VLForConditionalGeneration.from_pretrained(str(out))


def test_lora_without_peft_is_a_clear_error(task, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    code = main(args(task, tmp_path / "x", "--max-steps", "1", "--lora", "4"))
    assert code == 2
    assert "lora: needs peft, an optional extra (pip install 'gapkern[lora]')" in capsys.readouterr().err


def test_freeze_lm_trains_only_the_head(task, tmp_path):
    out = tmp_path / "head-only"
    assert main(args(task, out, "--max-steps", "3", "--freeze-lm", "--save-steps", "100")) == 0
    base, trained = weights(task["base"]), weights(out)
    assert all(torch.equal(base[k], trained[k]) for k in base)
    start = PCALatentHead.load(task["head"])
    assert not torch.equal(trained["gap.head.weight"], start.weight)


def test_output_as_input_without_head(task, tmp_path):
    out = tmp_path / "no-head"
    command = [a for a in args(task, out, "--max-steps", "2", "--logging-steps", "1", "--save-steps", "100")
               if a != task["head"]]
    command[command.index("--head")] = "--no-head"
    assert main(command) == 0
    with open(out / "config.json") as f:
        assert json.load(f)["gap"]["head"] is None
    assert any(e["latent_loss"] > 0 for e in logged(out))  # hidden states against the targets, over D


def test_curated_override_trains_every_line_as_text(task, tmp_path):
    easy = tmp_path / "easy.jsonl"
    with open(task["curated"]) as f:
        easy.write_text("".join(json.dumps(dict(json.loads(line), hard=False)) + "\n" for line in f))
    out = tmp_path / "easy"
    assert main(args(task, out, "--max-steps", "3", "--logging-steps", "1", "--curated", str(easy))) == 0
    assert [e["latent_loss"] for e in logged(out)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("change, message", [
    (("--head", None), "--head: .* is a plain Qwen2.5-VL checkpoint; pass a PCALatentHead file"),
    (("--data", "{folder}"), r"--data: folder: no build.json in"),
    (("--curated", "{short}"), r"curated: .* has no line for 4 training sample\(s\) \('t4', 't5', 't6', \.\.\.\)"),
    (("--curated", "{all_hard}"), r"targets: .* lacks 4 latent steps \(t1/1, t3/1, t5/1, \.\.\.\)"),
    (("--max-steps", "0"), "--max-steps: expected a positive number of steps"),
    (("--lr_scheduler_type", "nope"), r"trainer_args: not valid TrainingArguments flags \(.*invalid choice: 'nope'"),
    (("--no_such_flag", "1"), r"trainer_args: not TrainingArguments flags: --no_such_flag 1"),
])
def test_bad_arguments_are_one_line_errors(task, tmp_path, capsys, change, message):
    import re

    short, all_hard = tmp_path / "short.jsonl", tmp_path / "all-hard.jsonl"
    with open(task["curated"]) as f:
        lines = [json.loads(line) for line in f]
    short.write_text("".join(json.dumps(line) + "\n" for line in lines[:4]))
    all_hard.write_text("".join(json.dumps(dict(line, hard=True)) + "\n" for line in lines))
    command = args(task, tmp_path / "out", "--max-steps", "1")
    flag, value = change
    if flag in ("--lr_scheduler_type", "--no_such_flag"):
        command += ["--", flag, value]
    elif value is None:
        del command[command.index(flag):command.index(flag) + 2]
    elif flag in command:
        command[command.index(flag) + 1] = value.format(folder=task["folder"], short=short, curated=task["curated"])
    else:
        command += [flag, value.format(short=short, all_hard=all_hard)]
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1 and err[-1].startswith("gapkern train: error: ")
    assert re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "out").exists()  # nothing written for a run that fails before training


def test_train_prints_its_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith("usage: gapkern train ")
    for option in ("--model PATH", "--data DIR", "--out DIR", "--head FILE", "--no-head", "--lora R", "--resume"):
        assert option in out


def test_fsdp_without_an_accelerator_is_refused(task, tmp_path, capsys, monkeypatch):
    """On CPU ranks accelerate runs plain DDP for ``--fsdp`` (FSDP2; FSDP1 stops in sync_module_states): refused
    instead, before anything is written."""
    monkeypatch.setattr("torch.accelerator.is_available", lambda: False)
    out = tmp_path / "fsdp"
    assert main(args(task, out, "--max-steps", "1", "--", "--fsdp", "full_shard auto_wrap")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("gapkern train: error: trainer_args: --fsdp needs an accelerator (CUDA) to shard on and none is "
                   "available here (on CPU ranks accelerate would run plain DDP); drop --fsdp, or shard with "
                   "--deepspeed and a ZeRO config")
    assert not out.exists()
