"""``run_demo``: every stage in order into one folder, resuming a previous run of the same settings."""
from __future__ import annotations

import time

import torch
from transformers.utils import logging as hf_logging

from .folder import Folder
from .plan import PLANS
from .stages import STAGES, Run, run_stage

__all__ = ["DEFAULT_OUT", "run_demo"]

DEFAULT_OUT = "gapkern-demo"


def run_demo(out: str = DEFAULT_OUT, *, size: str = "full", seed: int = 0, progress: bool | None = None,
             until: str | None = None, echo=print) -> dict:
    """Run the demo into ``out``; returns ``{"state", "out", "wall", "table", "record"}``.

    ``size``: a :data:`gapkern.demo.plan.PLANS` key. ``until``: stop after
    that stage (no report). ``echo`` prints the one line per stage.
    """
    if size not in PLANS:
        raise ValueError(f"size: expected one of {', '.join(PLANS)}, got {size!r}")
    if until is not None and until not in STAGES:
        raise ValueError(f"until: expected a stage among {', '.join(STAGES)}, got {until!r}")
    plan = PLANS[size]
    folder = Folder(out, {"size": size, "seed": seed, "plan": plan.to_dict()})
    state = folder.open()
    run = Run(folder, plan, seed, progress)
    done = [name for name in STAGES if folder.done(name)]
    if state == "resumed":
        echo(f"gapkern demo: resuming {folder.path} ({len(done)} of {len(STAGES)} stages done by an earlier run)")
    else:
        echo(f"gapkern demo: size {size}, seed {seed}, into {folder.path}")
    start = time.perf_counter()
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much on a busy CPU
    hf_logging.disable_progress_bar()  # loading / saving bars for a 600 kB checkpoint are noise beside the stages'
    try:
        return _stages(run, state, start, until, echo)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _stages(run: Run, state: str, start: float, until: str | None, echo) -> dict:
    folder = run.folder
    for i, name in enumerate(STAGES, 1):
        tag = f"[{i:>2}/{len(STAGES)}] {name:<10}"
        if folder.done(name):
            echo(f"{tag}         done by an earlier run")
        else:
            began = time.perf_counter()
            summary, line = run_stage(run, name)
            seconds = time.perf_counter() - began
            folder.finish(name, {**summary, "seconds": seconds})
            echo(f"{tag} {seconds:6.1f} s  {line}")
        if name == until:
            return {"state": state, "out": folder.path, "wall": time.perf_counter() - start, "table": None,
                    "record": folder.record}
    from .report import write_report

    table = write_report(run)
    return {"state": state, "out": folder.path, "wall": time.perf_counter() - start, "table": table,
            "record": folder.record}
