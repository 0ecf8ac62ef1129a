"""``gapkern demo``: the GAP path end to end on a built-in synthetic task and a tiny Qwen2.5-VL.

- ``task``: the procedural image task (PNG files + sample files, SPEC 4.1).
- ``model``: the tiny Qwen2.5-VL and its word-level tokenizer over the task's words.
- ``plan``: the sizes of a run (``full``, ``small``).
- ``stages`` / ``measure``: each stage through the GAP path's library functions.
- ``folder`` / ``run`` / ``report``: the output folder, the run, report.md and the plots.
"""
from .folder import FolderError
from .run import DEFAULT_OUT, run_demo

__all__ = ["run_demo", "DEFAULT_OUT", "FolderError"]
