"""Line-by-line, resumable, rank-sharded work over a sample file: curation and evaluation run on it.

:func:`run_lines` computes one output line (a JSON object with the sample's
``id``) per sample, a batch of samples at a time, and appends each line to
``OUT.parts/part-RANK.jsonl`` as soon as its batch is done, next to
``OUT.parts/settings.json`` (the settings the lines were computed with).
A restarted run keeps every complete line, drops a torn last line, and
recomputes only the batches that miss a line (a batch is always the same
lines, so its numerics are the same too). When every line is there, rank 0
writes ``OUT`` atomically in input order and removes ``OUT.parts``. Under
torchrun each rank takes every world-th line; all ranks call with the same
arguments.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

from . import distributed
from ._io import atomic_write, atomic_write_json, atomic_write_text, read_json
from .outputs import holds_out

__all__ = ["ResumeError", "samples_digest", "run_lines", "read_lines"]


class ResumeError(ValueError):
    """OUT or OUT.parts holds something this run cannot continue (other settings, other lines, a damaged part)."""


def samples_digest(samples: list[dict]) -> str:
    """A short digest of the validated samples: a resumed run must see the same lines."""
    return hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()[:16]


def _changes(path: str, settings: dict) -> str:
    """'' when ``settings`` are those the JSON file ``path`` holds, else ``k old -> new, ...``."""
    before = read_json(path)
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


class _Parts:
    """``OUT.parts/``: the run's settings and one append-only part file per rank."""

    def __init__(self, out: str, rank: int, line_name: str):
        self.out, self.folder, self.line_name = out, out + ".parts", line_name
        self.own = os.path.join(self.folder, f"part-{rank:05d}.jsonl")
        self.settings = os.path.join(self.folder, "settings.json")

    def settle(self, settings: dict) -> None:
        """Rank 0: record the settings of a new run, or check that they are the interrupted run's."""
        if os.path.isfile(self.settings):
            what = _changes(self.settings, settings)
            if what:
                raise ResumeError(f"out: {self.folder!r} holds an interrupted run with other settings ({what}); "
                                  "rerun with its settings, or remove it to start over")
            return
        os.makedirs(self.folder, exist_ok=True)
        atomic_write_json(self.settings, settings, end="")

    def done(self) -> dict[str, str]:
        """id -> output line of every complete line of every part file (a torn last line is not complete)."""
        lines = {}
        for name in sorted(os.listdir(self.folder)):
            if name.startswith("part-") and name.endswith(".jsonl"):
                lines.update(self._complete_lines(os.path.join(self.folder, name)))
        return lines

    def _complete_lines(self, path: str) -> dict[str, str]:
        with open(path, "rb") as f:
            data = f.read()
        lines = {}
        for number, raw in enumerate(data[:data.rfind(b"\n") + 1].splitlines(keepends=True), 1):
            try:
                lines[json.loads(raw)["id"]] = raw.decode("utf-8")
            except (ValueError, KeyError, TypeError):
                raise ResumeError(f"out: {path}:{number} is not a {self.line_name}; remove that file to redo its "
                                  "lines") from None
        return lines

    def repair(self) -> None:
        """Cut this rank's part file after its last complete line (a write the kill tore)."""
        if os.path.isfile(self.own):
            with open(self.own, "rb") as f:
                data = f.read()
            os.truncate(self.own, data.rfind(b"\n") + 1)

    def append(self, line: str) -> None:
        with open(self.own, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def merge(self, samples: list[dict], keep_settings: str | None) -> None:
        """Write OUT in input order from the part files (and the settings to ``keep_settings``), then remove them."""
        lines = self.done()
        missing = [s["id"] for s in samples if s["id"] not in lines]
        if missing:
            raise RuntimeError(f"out: {len(missing)} line(s) missing from {self.folder!r} (first: {missing[0]!r})")
        if keep_settings is not None:
            atomic_write(keep_settings, lambda tmp: shutil.copyfile(self.settings, tmp))
        atomic_write_text(self.out, "".join(lines[s["id"]] for s in samples))
        shutil.rmtree(self.folder)


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def read_lines(path: str) -> list[dict]:
    """The JSON objects of a JSONL file, one a line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _finished(out: str, samples: list[dict], out_name: str, settings: dict, keep_settings: str | None) -> bool:
    """A finished OUT (no parts left) of these samples: nothing to do. Another file there is an error, and so is
    a finished run whose kept settings are not these."""
    if not os.path.isfile(out) or os.path.isdir(out + ".parts"):
        return False
    try:
        ids = [line.get("id") for line in read_lines(out)]
    except (ValueError, AttributeError):
        ids = None
    if ids != [s["id"] for s in samples]:
        raise ResumeError(f"out: {out!r} exists and is not the {out_name} of these samples; remove it or "
                          "choose another --out")
    if keep_settings is not None and os.path.isfile(keep_settings):
        what = _changes(keep_settings, settings)
        if what:
            raise ResumeError(f"out: {out!r} is a finished run with other settings ({what}); remove it to "
                              "rerun, or choose another --out")
    return True


@holds_out(folder=False)
def run_lines(samples: list[dict], out: str, settings: dict, compute, *, batch: int, desc: str,
              line_name: str = "output line", out_name: str = "output", keep_settings: str | None = None,
              progress: bool | None = None) -> int:
    """Write ``compute``'s lines for ``samples`` into the JSONL file ``out``; resumes an interrupted run.

    ``compute(chunk)`` returns one JSON-serialisable dict per sample of ``chunk`` (at most ``batch`` samples),
    in order, each with the sample's ``id``. ``settings`` (JSON) is what a resumed run must match.
    ``keep_settings``: a file that keeps the settings of the finished run, so a rerun with other settings is an
    error rather than a silent reuse. ``line_name`` / ``out_name`` name a line and ``out`` in errors.
    Returns how many lines an earlier run had finished (all of them when ``out`` was complete). ``out`` is
    checked writable first, and held by one process (:func:`gapkern.outputs.holds_out`) for the run.
    """
    from tqdm import tqdm

    rank, world = distributed.rank_world()
    if _finished(out, samples, out_name, settings, keep_settings):
        return len(samples)
    parts = _Parts(out, rank, line_name)
    if rank == 0:
        parts.settle(settings)
    distributed.barrier()
    parts.repair()
    done = parts.done()
    distributed.barrier()  # every rank has read the parts before any appends
    mine = samples[rank::world]
    chunks = [mine[i:i + batch] for i in range(0, len(mine), batch)]
    with tqdm(total=len(mine), initial=sum(s["id"] in done for s in mine), desc=desc, unit="line",
              disable=distributed.bar_disable(progress)) as bar:
        for chunk in chunks:
            if all(s["id"] in done for s in chunk):
                continue
            for sample, record in zip(chunk, compute(chunk), strict=True):
                if record.get("id") != sample["id"]:
                    raise ValueError(f"compute: returned the line of {record.get('id')!r} for {sample['id']!r}")
                if sample["id"] not in done:
                    parts.append(_line(record))
                    bar.update()
    distributed.barrier()
    if rank == 0:
        parts.merge(samples, keep_settings)
    distributed.barrier()
    return sum(s["id"] in done for s in samples)
