"""``evaluate``: a sample file through a patched model's batched ``generate`` (SPEC 4.6), one prediction line per
sample in a JSONL file, written resumably line by line (:mod:`gapkern.resumable`, as curation is); ``score_table``:
scores of several configurations as one Markdown table; ``write_scores``: ``scores.json`` and that table as
``scores.md``. Judging the answers and scoring are :mod:`gapkern.stages.scoring` (re-exported here).
"""
from __future__ import annotations

import dataclasses
import os

from ..errors import check_positive, check_samples
from .scoring import (choice_letter, extract_answer, is_correct, judge_needed, parse_number,  # noqa: F401 (re-exported)
                      prediction, score)

__all__ = ["extract_answer", "is_correct", "judge_needed", "score", "parse_number", "choice_letter", "prediction",
           "evaluate", "score_table", "write_scores"]


def evaluate(model, tokenizer, samples: list[dict], out: str, *, calibration: str | None = None, batch: int = 8,
             max_new_tokens: int = 512, temperature: float = 0.0, seed: int = 0, settings: dict | None = None,
             suppress: list[int] | None = None, span_at: int | None = None, identity: dict | None = None,
             keep_settings: str | None = None, desc: str = "eval", progress: bool | None = None,
             starts: dict | None = None, protocol: dict | None = None, rules: str = "gap") -> list[dict]:
    """Answer ``samples`` (``load_samples``' output) with the patched ``model`` (its head and GapConfig, with
    ``calibration`` if given, for this run only); write one :func:`prediction` line per sample to the JSONL
    file ``out``; return those lines.

    Resumes an interrupted run (a run that finds ``out`` finished returns its lines). ``temperature`` 0 is
    greedy; above, each line draws with a seed derived from ``seed`` and its id. Calibration ``rms`` / ``ema``:
    every batch starts from one running target (:func:`gapkern.stages.responses.ema_start`), so a resumed run, or N
    ranks, answer as one uninterrupted run; the model's own target is left as it was. ``settings``: the image
    settings (``gapkern.data.images.image_settings``). ``suppress`` / ``span_at``: as
    :func:`gapkern.stages.responses.generate_responses`. ``identity`` (e.g. the model path) joins the GapConfig, the
    head's shape, the samples (a digest) and the options in what a resumed run must match; ``keep_settings``:
    a file that keeps them after the run (:func:`gapkern.resumable.run_lines`). ``starts``: a dict shared by
    the runs of one loaded model (several calibration modes): the start target is computed once for it and
    these samples, batch and settings, and reused (the model's own target is restored after every run).
    ``protocol`` (:mod:`gapkern.protocol`): the prompt and every sampling setting (then ``temperature`` and
    ``max_new_tokens`` are the protocol's); ``rules``: how answers are judged (:func:`is_correct`).
    """
    from ..resumable import read_lines, run_lines, samples_digest
    from .responses import ema_start, generate_responses

    check_samples(samples)
    for name, value in (("batch", batch), ("max_new_tokens", max_new_tokens)):
        check_positive(name, value)
    gap = model.gap
    config, saved, start = gap.config, gap.tau_ema.detach().clone(), []
    starts = {} if starts is None else starts
    digest = samples_digest(samples)
    key = (digest, batch, repr(settings), config.ema_decay)

    def compute(chunk):
        if not start:  # once, and only when some line is left to answer
            calibrated = gap.config.calibration != "none"
            if calibrated and key not in starts:
                starts[key] = ema_start(model, samples, batch=batch, settings=settings)
            start.append(starts[key] if calibrated else None)
        responses = generate_responses(model, tokenizer, chunk, temperature=temperature,
                                       max_new_tokens=max_new_tokens, seed=seed, settings=settings,
                                       suppress=suppress, span_at=span_at, tau_ema=start[0], protocol=protocol)
        return [prediction(sample, one.text, one.latents, rules) for sample, (one,) in zip(chunk, responses)]

    try:
        if calibration is not None:
            gap.config = dataclasses.replace(config, calibration=calibration)
        if protocol is not None:
            temperature, max_new_tokens = protocol["temperature"], protocol["max_new_tokens"]
        run = {**(identity or {}), "gap": gap.to_dict(), "samples": digest, "batch": batch,
               "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "span_at": span_at,
               "suppress": list(suppress or [])}
        if protocol is not None or rules != "gap":
            run.update(protocol=protocol, rules=rules)
        run_lines(samples, out, run, compute, batch=batch, desc=desc, line_name="prediction line",
                  out_name="evaluation", keep_settings=keep_settings, progress=progress)
    finally:
        gap.config = config
        gap.tau_ema.copy_(saved)
    return read_lines(out)


def score_table(scores: dict[str, dict]) -> str:
    """A Markdown table of :func:`score` outputs keyed by configuration name: one row per configuration, one
    column per task (perception tasks first, then reasoning, each in first-seen order), then Avg-P and Avg-R;
    accuracies in percent, ``-`` where a configuration has no such task or category."""
    categories = {}
    for result in scores.values():
        for task in result["tasks"]:
            categories.setdefault(task, (result.get("categories") or {}).get(task))
    tasks = [t for t, c in categories.items() if c != "reasoning"] + [t for t, c in categories.items()
                                                                       if c == "reasoning"]

    def cell(value):
        return "-" if value is None else f"{100 * value:.1f}"

    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(["configuration", *tasks, "Avg-P", "Avg-R"]), row(["---"] * (len(tasks) + 3))]
    for name, result in scores.items():
        lines.append(row([name, *(cell(result["tasks"].get(t)) for t in tasks), cell(result.get("avg_p")),
                          cell(result.get("avg_r"))]))
    return "\n".join(lines) + "\n"


def write_scores(folder: str, scores: dict[str, dict]) -> tuple[str, str]:
    """``folder/scores.json`` (``scores``) and ``folder/scores.md`` (:func:`score_table`), atomically; their paths."""
    from .._io import atomic_write_json, atomic_write_text

    json_path, md_path = os.path.join(folder, "scores.json"), os.path.join(folder, "scores.md")
    atomic_write_json(json_path, scores, ensure_ascii=False)
    atomic_write_text(md_path, score_table(scores))
    return json_path, md_path
