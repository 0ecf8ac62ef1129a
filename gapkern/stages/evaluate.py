"""Judging answers and scoring runs (SPEC 4.6).

- ``extract_answer``: the text inside the last ``<answer>...</answer>``, else
  the last non-empty line.
- ``is_correct``: multiple choice (``choices`` given, ``answer`` a letter):
  a bare letter (``B``, ``(b)``, ``B.``), else the choice whose text the answer
  equals (case, spacing and surrounding punctuation ignored), else the first
  standalone capital letter among the choices' letters (``answer: B``).
  Numbers (``answer`` a number, or a string that is one): the last number in
  the text, thousands separators removed, words and units ignored, equal
  within 1e-6 relative. Free text: equal after lower-casing and collapsing
  runs of whitespace and punctuation.
- ``score``: accuracy per task; Avg-P / Avg-R are the mean accuracies over
  the perception / reasoning tasks (None when a category has no task).
- ``evaluate``: a sample file through a patched model's batched ``generate``,
  one prediction line per sample (:func:`prediction`) in a JSONL file, written
  resumably line by line (:mod:`gapkern.resumable`, as curation is).
- ``score_table``: scores of several configurations as one Markdown table;
  ``write_scores``: ``scores.json`` and that table as ``scores.md``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import string

from ..data import CATEGORIES  # the sample file's categories (SPEC 4.1)
from ..errors import check_positive, check_samples

__all__ = ["extract_answer", "is_correct", "judge_needed", "score", "parse_number", "choice_letter", "prediction", "evaluate",
           "score_table", "write_scores"]

RELATIVE_TOLERANCE = 1e-6

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# A sign only where it cannot be a hyphen inside a word or a range ("3-4" ends with 4, not -4);
# thousands groups of exactly three digits, so a list "1,2,3" stays three numbers.
_NUMBER = re.compile(r"(?<![\w.])[-+\u2212]?(?=\.?\d)(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
_PUNCT = string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u2212\u3002\uff0c\uff1a"


def extract_answer(text: str) -> str:
    """The text inside the last ``<answer>...</answer>``, else the last non-empty line, stripped ('' if none)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    tagged = _ANSWER.findall(text)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (thousands separators removed, words and units ignored), or None."""
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def _to_float(number: str) -> float:
    return float(number.replace(",", "").replace("\u2212", "-"))


RULES = ("gap", "vlmevalkit")


def is_correct(prediction: str, sample: dict, rules: str = "gap") -> bool:
    """Whether the model's response ``prediction`` answers ``sample`` (its ``answer``, optional ``choices``).

    ``prediction`` is the raw response: the answer is extracted here. ``rules="vlmevalkit"``: VLMEvalKit's
    rule-based verdict (:mod:`gapkern.vlmeval_rules`); a line that needs its judge is False here
    (:func:`judge_needed`).
    """
    if not isinstance(sample, dict) or "answer" not in sample:
        raise ValueError("sample: expected a dict with an 'answer' (and optional 'choices')")
    if rules not in RULES:
        raise ValueError(f"rules: expected one of {', '.join(RULES)}, got {rules!r}")
    if rules == "vlmevalkit":
        from ..vlmeval_rules import verdict

        return verdict(prediction, sample) is True
    answer, choices = sample["answer"], sample.get("choices")
    given = extract_answer(prediction)
    if choices:
        letter = choice_letter(given, choices)
        return letter is not None and letter == str(answer).strip().upper()
    expected = _as_number(answer)
    if expected is not None:
        value = parse_number(given)
        return value is not None and math.isclose(value, expected, rel_tol=RELATIVE_TOLERANCE, abs_tol=0.0)
    return _normalize(given) == _normalize(str(answer))


def judge_needed(prediction: str, sample: dict) -> bool:
    """Whether VLMEvalKit would ask its GPT judge about this response (its rules find no answer)."""
    from ..vlmeval_rules import verdict

    return verdict(prediction, sample) is None


_CUE = re.compile(r"answer\s*(?:is|:)|\bchoose\b|\bchoice\s*(?:is|:)|\boption\s*(?:is|:)|\bselect\b",
                  re.IGNORECASE)


def choice_letter(given: str, choices: list[str]) -> str | None:
    """The letter an extracted answer commits to among ``choices`` (A, B, ...), or None (SPEC 4.6).

    A bare letter (``B``, ``(b)``, ``B.``); else the one letter standing alone (among the choices' letters);
    where several different ones do, the first after the last answer cue ("answer is", "answer:", "choose",
    ...), or none; else the choice whose text the answer equals.
    """
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    bare = given.strip().strip(_PUNCT + " ").strip()
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    found = [m for m in _LETTER.finditer(given) if m.group(1) in letters]
    if len({m.group(1) for m in found}) == 1:
        return found[0].group(1)
    if found:
        cues = list(_CUE.finditer(given))
        after = [m.group(1) for m in found if cues and m.start() >= cues[-1].end()]
        return after[0] if after else None
    picked = _matching_choice(given, choices)
    return None if picked is None else letters[picked]


def _matching_choice(given: str, choices: list[str]) -> int | None:
    """The one choice the answer equals: exactly (case and spacing aside), else with surrounding punctuation
    stripped too; None when none or several match (choices "-1" and "1" both match "1." loosely)."""
    for key in (_spacing, lambda s: _spacing(s).strip(_PUNCT + " ")):
        target = key(given)
        hits = [i for i, choice in enumerate(choices) if key(str(choice)) == target]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None
    return None


def _spacing(text: str) -> str:
    return " ".join(text.lower().split())


def _normalize(text: str) -> str:
    """Lower-case; every run of whitespace and punctuation becomes one space."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def _as_number(answer) -> float | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return float(answer)
    if isinstance(answer, str) and _NUMBER.fullmatch(answer.strip()):
        return _to_float(answer.strip())
    return None


def score(records) -> dict:
    """``records``: dicts with ``task``, ``category`` and ``correct`` (bool).

    Returns ``{"tasks": {task: accuracy}, "counts": {task: lines}, "categories": {task: category}, "avg_p": ...,
    "avg_r": ...}``: Avg-P / Avg-R average the tasks' accuracies (each task weighs the same), None when no task
    has that category.
    """
    records, hits, counts, category = list(records), {}, {}, {}
    for i, record in enumerate(records):
        task, cat, correct = (record.get(k) for k in ("task", "category", "correct"))
        if not isinstance(task, str) or not task:
            raise ValueError(f"records[{i}]: 'task' must be a non-empty str, got {task!r}")
        if cat not in CATEGORIES:
            raise ValueError(f"records[{i}]: 'category' must be one of {', '.join(CATEGORIES)}, got {cat!r}")
        if not isinstance(correct, bool):
            raise ValueError(f"records[{i}]: 'correct' must be a bool, got {correct!r}")
        if category.setdefault(task, cat) != cat:
            raise ValueError(f"records[{i}]: task {task!r} is {category[task]} in earlier records, {cat} here")
        counts[task] = counts.get(task, 0) + 1
        hits[task] = hits.get(task, 0) + correct
    tasks = {task: hits[task] / counts[task] for task in counts}
    judged = [r for r in records if r.get("rules") == "vlmevalkit"]
    extra = {}
    if judged:  # VLMEvalKit's averaging (HRBench per cycle), and the lines its GPT judge would have to score
        from ..vlmeval_rules import task_accuracy

        tasks = {task: task_accuracy(task, [r for r in judged if r["task"] == task]) for task in counts}
        extra = {"needs_judge": {t: sum(bool(r.get("needs_judge")) for r in judged if r["task"] == t) for t in counts},
                 "judge_lines": {t: [r["id"] for r in judged if r["task"] == t and r.get("needs_judge")]
                                 for t in counts}}

    def average(cat):
        values = [acc for task, acc in tasks.items() if category[task] == cat]
        return sum(values) / len(values) if values else None

    return {"tasks": tasks, "counts": counts, "categories": category, "avg_p": average("perception"),
            "avg_r": average("reasoning"), **extra}


def prediction(sample: dict, text: str, latents: int = 0, rules: str = "gap") -> dict:
    """One line of an evaluation's predictions: ``id``, ``task``, ``category``, ``expected`` (the sample's
    answer), ``prediction`` (the response text), ``answer`` (extracted), ``correct``, ``latents`` (written);
    ``rules="vlmevalkit"``: also ``rules``, ``needs_judge`` and the sample's ``meta`` (HRBench's cycles)."""
    line = {"id": sample["id"], "task": sample["task"], "category": sample["category"], "expected": sample["answer"],
            "prediction": text, "answer": extract_answer(text), "correct": is_correct(text, sample, rules),
            "latents": int(latents)}
    if rules == "vlmevalkit":
        line.update(rules=rules, needs_judge=judge_needed(text, sample), meta=sample.get("meta") or {})
    return line


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
