"""Run ``gapkern ARGS`` and signal the process itself at a named point of its work (issue 17 item 12).

    python tests/kill_at.py POINT SIGNAL -- ARGS...

A deterministic kill: the point is a patched function, not a timer, so the test holds on a loaded machine.
POINT: ``line`` (after the first output line is appended: curate, eval), ``torn-line`` (half of the first line
written, then the signal), ``shard`` (after the first target shard is written), ``shard-tmp`` (a shard's temp
file written, before its rename), ``checkpoint`` (a training checkpoint's weights written, before the rest of
it). SIGNAL: KILL or INT. Prints ``signalled`` to stderr just before.
"""
from __future__ import annotations

import os
import signal
import sys


def _signal(name: str) -> None:
    print("signalled", file=sys.stderr, flush=True)
    os.kill(os.getpid(), getattr(signal, "SIG" + name))  # INT: a KeyboardInterrupt at the next bytecode


def _patch(point: str, name: str) -> None:
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
    elif point == "checkpoint":
        from transformers import Trainer

        real = Trainer._save

        def save(self, output_dir=None, state_dict=None):
            real(self, output_dir, state_dict)
            if output_dir and "checkpoint-" in os.path.basename(output_dir):
                _signal(name)
        Trainer._save = save
    else:
        raise SystemExit(f"kill_at: unknown point {point!r}")


if __name__ == "__main__":
    point, name, dashes, *argv = sys.argv[1:]
    assert dashes == "--"
    _patch(point, name)
    from gapkern.cli import main

    sys.exit(main(argv))
