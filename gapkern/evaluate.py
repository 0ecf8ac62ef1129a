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
"""
from __future__ import annotations

import math
import re
import string

__all__ = ["extract_answer", "is_correct", "score", "parse_number", "choice_letter"]

CATEGORIES = ("perception", "reasoning")
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


def is_correct(prediction: str, sample: dict) -> bool:
    """Whether the model's response ``prediction`` answers ``sample`` (its ``answer``, optional ``choices``).

    ``prediction`` is the raw response: the answer is extracted here.
    """
    if not isinstance(sample, dict) or "answer" not in sample:
        raise ValueError("sample: expected a dict with an 'answer' (and optional 'choices')")
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


def choice_letter(given: str, choices: list[str]) -> str | None:
    """The letter an extracted answer picks among ``choices`` (A, B, ...), or None."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    bare = given.strip().strip(_PUNCT + " ").strip()
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    picked = _matching_choice(given, choices)
    if picked is not None:
        return letters[picked]
    for letter in _LETTER.findall(given):
        if letter in letters:
            return letter
    return None


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

    Returns ``{"tasks": {task: accuracy}, "counts": {task: lines}, "avg_p": ..., "avg_r": ...}``:
    Avg-P / Avg-R average the tasks' accuracies (each task weighs the same), None when no task has that category.
    """
    hits, counts, category = {}, {}, {}
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

    def average(cat):
        values = [acc for task, acc in tasks.items() if category[task] == cat]
        return sum(values) / len(values) if values else None

    return {"tasks": tasks, "counts": counts, "avg_p": average("perception"), "avg_r": average("reasoning")}
