"""The difficulty rule the demo's task is sized by, written down before any arm but base and text-only was run.

The task (``gapkern.demo.task``) and the plan's steps are chosen so that the
comparisons have room to show: only the **base** and **text-only** rows may
be looked at while sizing, in that order, and nothing is changed after the
other arms (output-as-input, PCA all-latent, GAP, full-dim head) have been
scored. The rule, on the full plan, seed 0:

1. the base model is between 30% and 60% on the perception task;
2. the text-only control is below 90% on the perception task at the end of
   its steps;
3. no configuration is at 100% on any task.

:func:`check` says, for a finished run, which parts hold; the report prints it
whatever comes out (a run that misses the rule is reported, not tuned).

Version 1 (commit 57a0102) sized the small square at 6 px then 4 px, with 100 base steps and 300 arm steps. Its
full run at 4 px missed parts 2 and 3: text-only reached 100% on colour.

Version 2 (2026-12-06), written after that run and before any run of it: the rule's three parts unchanged; the
plan (lines, steps, model, every other setting) unchanged; only the small square's side (``Plan.small_square``)
moves, down the fixed list :data:`SIZING` = 3, 2, 1 px. For each side in turn, one run of the stages up to the
text-only arm (task, init, base, fit-pca, curate, build-data, train-text) and the eval of **base and text-only
only** (``scripts/demo_sizing.py``); the first side at which parts 1 and 2 both hold is taken; if none does, the
last one tried. Then one full run at that side, reported whatever comes out, and nothing changed after it.
"""
from __future__ import annotations

__all__ = ["RULE", "SIZING", "check"]

SIZING = (3, 2, 1)  # version 2: the small square's sides tried, in this order

RULE = ("base between 30% and 60% on perception; text-only below 90% on perception at the end of its steps; "
        "no configuration at 100% on any task")


def check(scores: dict, perception: str, *, base: str = "base", text: str = "text-only") -> dict[str, bool]:
    """``scores``: configuration name -> ``gapkern.evaluate.score`` output; ``perception``: the perception task."""
    return {"base 30-60% on perception": 0.30 <= scores[base]["tasks"][perception] <= 0.60,
            "text-only < 90% on perception": scores[text]["tasks"][perception] < 0.90,
            "no configuration at 100%": all(value < 1.0 for result in scores.values()
                                            for value in result["tasks"].values())}
