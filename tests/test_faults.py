"""Issue 17 item 12: a stage killed (SIGKILL) or interrupted (SIGINT) at a point of its work, then rerun, ends
with the outputs of an uninterrupted run, byte for byte: no line lost or doubled, no torn file taken as whole.

The signal comes from inside the process at a patched function (tests/kill_at.py), not after a fixed sleep, so
the point is the same on a loaded machine; the killed run is a subprocess, the reruns run in this process."""
from __future__ import annotations

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


def argv(folder, command, out):
    model, samples = str(folder / "model"), str(folder / "train.jsonl")
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
    done = {}

    def run(command):
        if command not in done:
            out = tmp_path_factory.mktemp("whole") / ("out.jsonl" if command == "curate" else "out")
            assert main(argv(folder, command, str(out))) == 0
            done[command] = snapshot(out)
        return done[command]
    return run


@pytest.mark.parametrize("command, point, signal", [
    ("curate", "torn-line", "KILL"), ("eval", "line", "INT"), ("build-data", "shard-tmp", "KILL"),
])
def test_killed_then_rerun_equals_an_uninterrupted_run(folder, uninterrupted, tmp_path, command, point, signal):
    out = tmp_path / ("out.jsonl" if command == "curate" else "out")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kill_at.py"), point, signal, "--",
                             *argv(folder, command, str(out))], capture_output=True, text=True, env=env,
                            timeout=600, cwd=str(tmp_path))
    assert "signalled" in killed.stderr and killed.returncode != 0, killed.stderr[-2000:]
    if signal == "KILL":
        assert killed.returncode == -9
    partial = snapshot(out) if os.path.exists(out) else {}
    assert partial != uninterrupted(command)  # it stopped part-way
    assert main(argv(folder, command, str(out))) == 0
    assert snapshot(out) == uninterrupted(command)
