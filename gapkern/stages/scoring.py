"""Judging answers and scoring runs (SPEC 4.6): text in, verdicts and accuracies out; no model.

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
- ``prediction``: one prediction line (SPEC 4.6) of a sample and its response.

The run that produces the responses is :mod:`gapkern.stages.evaluate`.
"""
from __future__ import annotations

import math
import os
import re
import string

from ..data import CATEGORIES  # the sample file's categories (SPEC 4.1)

__all__ = ["extract_answer", "is_correct", "judge_needed", "score", "parse_number", "choice_letter", "prediction"]

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


