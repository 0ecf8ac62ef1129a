"""``gapkern demo --seeds N``: N demos (seeds s, s+1, ...) in ``OUT/seed-S/``, and their mean ± spread."""
from __future__ import annotations

import os
import statistics

from .._io import atomic_write_json, atomic_write_text
from .run import run_demo

__all__ = ["run_seeds", "spread"]

KEYS = (("avg_p", "Avg-P"), ("avg_r", "Avg-R"), ("span_rate", "span rate"))


def spread(runs: list[dict]) -> dict:
    """Configuration -> key -> ``{"mean", "sd", "values"}`` over the runs' eval scores (sd 0 for one run)."""
    out = {}
    for name in runs[0]:
        out[name] = {}
        for key, _ in KEYS:
            values = [run[name][key] for run in runs]
            out[name][key] = {"mean": statistics.fmean(values),
                              "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    return out


def run_seeds(out: str, *, size: str, seed: int, seeds: int, echo=print) -> dict:
    """Each seed's demo (resumable, as one demo is), then ``OUT/seeds.json`` and ``OUT/seeds.md``."""
    runs = []
    for s in range(seed, seed + seeds):
        result = run_demo(os.path.join(out, f"seed-{s}"), size=size, seed=s, echo=echo)
        runs.append(result["record"]["stages"]["eval"]["scores"])
    found = spread(runs)
    lines = [f"Mean ± standard deviation over {seeds} seeds ({seed}..{seed + seeds - 1}), in %:", "",
             "| configuration | " + " | ".join(label for _, label in KEYS) + " |", "| --- |" + " ---: |" * len(KEYS)]
    for name, keys in found.items():
        cells = [f"{100 * keys[k]['mean']:.1f} ± {100 * keys[k]['sd']:.1f}" for k, _ in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    atomic_write_json(os.path.join(out, "seeds.json"), {"seeds": list(range(seed, seed + seeds)), "scores": found})
    atomic_write_text(os.path.join(out, "seeds.md"), table + "\n")
    return {"table": table, "scores": found}
