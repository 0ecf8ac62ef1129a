"""Issue 17 item 12: a stage killed (SIGKILL) or interrupted (SIGINT) at a point of its work, then rerun, ends
with the outputs of an uninterrupted run, byte for byte: no line lost or doubled, no torn file taken as whole.

The signal comes from inside the process at a patched function (tests/kill_at.py), not after a fixed sleep, so
the point is the same on a loaded machine; the killed run is a subprocess, the reruns run in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gapkern.cli import main

from stages import stage_folder

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return stage_folder(tmp_path_factory.mktemp("faults"), 4)


def argv(folder, command, out, data=None):
    model, samples = str(folder / "model"), str(folder / "train.jsonl")
    if command == "train":  # 6 steps over 4 lines, a checkpoint every 2 (one kept)
        return ["train", "--model", str(folder / "gap"), "--data", data, "--out", out, "--max-steps", "6",
                "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-3", "--batch", "1"]
    return {
        "curate": ["curate", "--model", model, "--samples", samples, "--out", out, "--attempts", "2",
                   "--max-new-tokens", "3", "--batch", "1"],
        "eval": ["eval", "--model", str(folder / "gap"), "--samples", samples, "--out", out, "--max-new-tokens", "3",
                 "--batch", "1", "--only", "gap/none"],
        "build-data": ["build-data", "--model", model, "--samples", samples, "--out", out, "--grid", "2",
                       "--shard-size", "1", "--batch-images", "1"],
    }[command]


def snapshot(path) -> dict:
    """Every file under ``path`` (or ``path`` itself and its OUT.* siblings), name -> bytes."""
    path = str(path)
    if os.path.isdir(path):
        return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(path) for f in files}
    parent, base = os.path.split(path)
    return {f: open(os.path.join(parent, f), "rb").read() for f in os.listdir(parent) if f.startswith(base)}


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    """command -> (snapshot of an uninterrupted run's output, that output's path); train reads build-data's."""
    done = {}

    def run(command):
        if command not in done:
            out = tmp_path_factory.mktemp("whole") / ("out.jsonl" if command == "curate" else "out")
            data = run("build-data")[1] if command == "train" else None
            assert main(argv(folder, command, str(out), data)) == 0
            done[command] = snapshot(out), str(out)
        return done[command]
    return run


def same_training(got: dict, want: dict) -> None:
    """Two train outputs hold the same files byte for byte, but for the last log entry of trainer_state.json, the
    Trainer's summary of the call that finished: its timings (train_runtime, train_samples_per_second,
    train_steps_per_second) differ by nature, and its train_loss is the mean over the steps that call ran
    (transformers' Trainer._finalize_training: ``_total_loss_scalar / (global_step - _initial_global_step)``),
    so a resumed call's covers only its own steps. Every per-step entry is equal."""
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")

    def state(raw):
        state = json.loads(raw)
        state["log_history"] = [{k: v for k, v in entry.items() if k not in timing} for entry in state["log_history"]]
        return state
    assert sorted(got) == sorted(want)
    got_state, want_state = state(got["trainer_state.json"]), state(want["trainer_state.json"])
    for a, b in zip(got_state.pop("log_history"), want_state.pop("log_history"), strict=True):
        assert a == b
    assert got_state == want_state
    for name in want:
        if os.path.basename(name) == "training_args.bin":  # pickled TrainingArguments: they hold the --out path
            assert arguments(got[name]) == arguments(want[name]), name
        elif name != "trainer_state.json":
            assert got[name] == want[name], name


def arguments(raw: bytes) -> dict:
    import io

    import torch

    fields = torch.load(io.BytesIO(raw), weights_only=False).to_dict()
    return {k: v for k, v in fields.items() if k not in ("output_dir", "logging_dir")}


@pytest.mark.parametrize("command, point, signal", [
    ("curate", "torn-line", "KILL"), ("eval", "line", "INT"), ("build-data", "shard-tmp", "KILL"),
    ("train", "checkpoint@4", "KILL"), ("train", "checkpoint-state@4", "KILL"), ("train", "step@3", "INT"),
])
def test_killed_then_rerun_equals_an_uninterrupted_run(folder, uninterrupted, tmp_path, command, point, signal):
    """Training reruns with --resume: from checkpoint-2, as the checkpoint-4 whose save was cut (after its weights,
    or half of its trainer_state.json) is not there to be taken for whole; a losses and weights byte for byte."""
    out = tmp_path / ("out.jsonl" if command == "curate" else "out")
    data = uninterrupted("build-data")[1] if command == "train" else None
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kill_at.py"), point, signal, "--",
                             *argv(folder, command, str(out), data)], capture_output=True, text=True, env=env,
                            timeout=600, cwd=str(tmp_path))
    assert "signalled" in killed.stderr and killed.returncode != 0, killed.stderr[-2000:]
    if signal == "KILL":
        assert killed.returncode == -9
    partial = snapshot(out) if os.path.exists(out) else {}
    want = uninterrupted(command)[0]
    assert partial != want  # it stopped part-way
    if command == "train":
        checkpoints = sorted({name.split(os.sep)[0] for name in partial if name.startswith("checkpoint-")})
        assert checkpoints == ["checkpoint-2"]  # the one whole checkpoint; the cut one is not under its name
        assert main([*argv(folder, command, str(out), data), "--resume"]) == 0
        same_training(snapshot(out), want)
        return
    assert main(argv(folder, command, str(out))) == 0
    assert snapshot(out) == want
