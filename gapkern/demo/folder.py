"""The demo's output folder: its layout, and ``demo.json``, the record of the settings and the finished stages.

A folder is new (missing or empty), a previous demo of the same settings
(resumed: its finished stages are skipped), or refused: a folder that holds
other files, or a demo of other settings.
"""
from __future__ import annotations

import os

from .._io import atomic_write_json, read_json

__all__ = ["RECORD", "FORMAT", "FolderError", "Folder"]

RECORD, FORMAT = "demo.json", "gapkern-demo/1"


class FolderError(ValueError):
    """The output folder cannot take this run: the message says why and what to do."""


class Folder:
    """``path`` and its record; ``open`` says whether the run is new or resumes."""

    def __init__(self, path: str, settings: dict):
        self.path, self.settings = os.path.abspath(path), settings
        self.record = {"format": FORMAT, "settings": settings, "stages": {}}

    def __call__(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def open(self) -> str:
        """Create or check the folder; returns ``"new"`` or ``"resumed"``."""
        from ..outputs import OutputError, check_writable

        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise FolderError(f"out: {self.path!r} is a file; expected a folder for the demo's outputs")
        try:  # a folder under one nobody may write into: refused before anything is made
            check_writable(self.path, folder=True)
        except OutputError as exc:
            raise FolderError(str(exc)) from None
        entries = os.listdir(self.path) if os.path.isdir(self.path) else []
        if not entries:
            os.makedirs(self.path, exist_ok=True)
            self._write()
            return "new"
        record_path = self(RECORD)
        if not os.path.isfile(record_path):
            raise FolderError(f"out: {self.path!r} is not empty and holds no {RECORD}, so it is not a gapkern demo "
                              "folder; choose another --out (nothing was written)")
        try:
            record = read_json(record_path)
        except (OSError, ValueError) as exc:
            raise FolderError(f"out: {exc}; remove the folder or choose another --out") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise FolderError(f"out: {record_path!r} is not a {FORMAT} record; choose another --out")
        before = record.get("settings") or {}
        changed = sorted(k for k in set(before) | set(self.settings) if before.get(k) != self.settings.get(k))
        if changed:
            what = ", ".join(f"{k} {before.get(k)!r} (asked {self.settings.get(k)!r})" for k in changed)
            raise FolderError(f"out: {self.path!r} holds a demo with other settings: {what}; rerun with its "
                              "settings to resume it, or choose another --out")
        self.record = record
        return "resumed"

    def done(self, stage: str) -> dict | None:
        """The summary of a finished stage, or None."""
        return self.record["stages"].get(stage)

    def finish(self, stage: str, summary: dict) -> None:
        self.record["stages"][stage] = summary
        self._write()

    def put(self, key: str, value) -> None:
        """A top-level entry of the record besides the settings and the stages (the report's tables)."""
        if key in ("format", "settings", "stages"):
            raise ValueError(f"key: {key!r} is the record's own; expected another name")
        self.record[key] = value
        self._write()

    def _write(self) -> None:
        atomic_write_json(self(RECORD), self.record)
