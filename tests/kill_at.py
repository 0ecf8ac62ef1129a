"""Run ``gapkern ARGS`` and signal the process itself at a named point of its work (issue 17 item 12).

    python tests/kill_at.py POINT SIGNAL -- ARGS...

A deterministic kill: the point is a patched function, not a timer, so the test holds on a loaded machine.
POINT: ``line`` (after the first output line is appended: curate, eval), ``torn-line`` (half of the first line
written, then the signal), ``shard`` (after the first target shard is written), ``shard-tmp`` (a shard's temp
file written, before its rename), ``checkpoint@N`` (training: checkpoint-N's weights written, before the rest of
it), ``checkpoint-state@N`` (checkpoint-N written but for half of its trainer_state.json, the file written
last), ``step@N`` (training: after step N's log line, between checkpoints), ``stage@NAME`` (demo: stage NAME's
work done, before demo.json records it). Without ``@N`` a checkpoint point signals at the first checkpoint.
SIGNAL: KILL or INT. Prints ``signalled`` to stderr just before.
"""
from __future__ import annotations

import os
import signal
import sys


def _signal(name: str) -> None:
    print("signalled", file=sys.stderr, flush=True)
    os.kill(os.getpid(), getattr(signal, "SIG" + name))  # INT: a KeyboardInterrupt at the next bytecode


def _patch(point: str, name: str) -> None:
    point, _, arg = point.partition("@")
    arg = arg or None
    from gapkern import _io, resumable
    from gapkern.data import targets

    if point in ("line", "torn-line"):
        real = resumable._Parts.append

        def append(self, line):
            if point == "torn-line":
                with open(self.own, "a", encoding="utf-8") as f:
                    f.write(line[:len(line) // 2])
            else:
                real(self, line)
            _signal(name)
        resumable._Parts.append = append
    elif point == "shard":
        real = targets.TargetWriter.write

        def write(self, index, tensors):
            real(self, index, tensors)
            _signal(name)
        targets.TargetWriter.write = write
    elif point == "shard-tmp":
        def save(tensors, path, metadata=None):
            from safetensors.torch import save_file

            def write(tmp):
                save_file(tensors, tmp, metadata=metadata)
                _signal(name)
            _io.atomic_write(path, write)
        targets.atomic_save_file = save
    elif point in ("checkpoint", "checkpoint-state"):
        from transformers import Trainer, TrainerState

        def wanted(path):
            name = os.path.basename(os.path.normpath(path or ""))
            return name.startswith("checkpoint-") and (arg is None or name == f"checkpoint-{arg}")

        if point == "checkpoint":
            real = Trainer._save

            def save(self, output_dir=None, state_dict=None):
                real(self, output_dir, state_dict)
                if wanted(output_dir):
                    _signal(name)
            Trainer._save = save
        else:
            real = TrainerState.save_to_json

            def save_to_json(self, json_path):
                if not wanted(os.path.dirname(json_path)):
                    return real(self, json_path)
                real(self, json_path)
                with open(json_path, "r+b") as f:
                    f.truncate(os.path.getsize(json_path) // 2)
                _signal(name)
            TrainerState.save_to_json = save_to_json
    elif point == "step":
        from gapkern.train.trainer import GapTrainer

        real = GapTrainer.log

        def log(self, logs, *args, **kwargs):
            real(self, logs, *args, **kwargs)
            if "loss" in logs and self.state.global_step == int(arg):
                _signal(name)
        GapTrainer.log = log
    elif point == "stage":
        from gapkern.demo.folder import Folder

        real = Folder.finish

        def finish(self, stage, summary):
            if stage == arg:
                _signal(name)
            real(self, stage, summary)
        Folder.finish = finish
    else:
        raise SystemExit(f"kill_at: unknown point {point!r}")


if __name__ == "__main__":
    point, name, dashes, *argv = sys.argv[1:]
    assert dashes == "--"
    _patch(point, name)
    from gapkern.cli import main

    sys.exit(main(argv))
