"""Every GAP stage is a ``gapkern`` subcommand with its own --help (from the package and as ``python -m``)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import gapkern
from gapkern.cli import main
from gapkern.commands import STAGES

COMMANDS = ["fit-pca", "build-data", "curate", "eval", "diagnose"]


def test_the_stages_are_registered_in_order():
    assert STAGES[:6] == ("fit_pca", "build_data", "curate", "train", "evaluate", "diagnose")


@pytest.mark.parametrize("module", STAGES)
def test_every_stage_prints_its_help(capsys, module):
    name = importlib.import_module(f"gapkern.commands.{module}").NAME
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"usage: gapkern {name} ") and "--help" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_stage_prints_its_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"usage: gapkern {command} ")
    assert "--model PATH" in out and "--samples FILE" in out and "--out" in out


def test_python_m_gapkern_cli_lists_the_stages():
    tree = os.path.dirname(os.path.dirname(gapkern.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "gapkern.cli", "--help"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and all(command in done.stdout for command in COMMANDS), done.stdout + done.stderr
