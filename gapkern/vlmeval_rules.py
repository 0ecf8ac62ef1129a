"""VLMEvalKit's rule-based (exact-matching) judging, per benchmark (SPEC 4.6, ``rules="vlmevalkit"``).

``verdict(prediction, sample)`` is True / False, or None where VLMEvalKit
would ask its GPT judge ("needs a judge": counted and listed, never guessed).
The benchmark is the sample's ``task``:

- MCQ benchmarks (MMStar, HRBench4K / 8K, and any TSV with option columns):
  ``can_infer`` on the whole response; no letter -> needs a judge.
- MME-RealWorld(-Lite): the text inside ``<answer>`` (upper-cased) else the
  response, through ``extract_characters_regex``; nothing -> wrong.
- MathVista_MINI: the prefetch (``post_check(prefetch=True)``): choices via
  ``can_infer``; integer / float answers when the whole response parses as one
  and equals it; anything else needs a judge.
- WeMath: the text after the last "Answer", ``>`` ``<`` ``:`` ``.`` removed,
  its first character among A-H.

HRBench's score is the mean over ``cycle_category`` of the per-cycle accuracy
(:func:`task_accuracy`).
"""
from __future__ import annotations

import ast
import math
import re

__all__ = ["can_infer_option", "can_infer_text", "can_infer", "extract_characters_regex", "verdict",
           "task_accuracy"]

_REJECT = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
           "I'm sorry, but without the image provided", "Cannot determine the answer")
_SPLIT_CHARS = ".()[],:;!*#{}"
_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
             "The correct option is", "Best answer:", "Best option:")


def can_infer_option(answer: str, choices: dict) -> str | bool:
    """The option letter standing alone among the response's last four tokens (punctuation split off), 'Z' for a
    refusal, the letter after "answer is", else False. ``choices``: letter -> option text."""
    if "Failed to obtain answer via API" in answer:
        return False
    if any(err in answer for err in _REJECT):
        return "Z"
    splits = answer.translate(str.maketrans(_SPLIT_CHARS, " " * len(_SPLIT_CHARS))).split()
    count = sum(letter in splits for letter in choices)
    if count == 1:
        for letter in choices:
            if letter in splits and splits.index(letter) > len(splits) - 5:
                return letter
    elif count == 0 and "Z" in splits:
        return "Z"
    match = _VERBOSE.search(answer or "")
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return False


def can_infer_text(answer: str, choices: dict) -> str | bool:
    """The one option whose text the (short enough) response contains, lower-cased; else False."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else False


def can_infer(answer, choices: dict) -> str | bool:
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def extract_characters_regex(s: str, choices=("(A)", "(B)", "(C)", "(D)", "(E)")) -> str:
    """MME-RealWorld's extraction: answer prefixes removed, the first capital A-E, else the option the text is
    part of, else ''."""
    s = s.strip()
    for prefix in _PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    match = re.search(r"[ABCDE]", s)
    if match is None:
        for choice in choices:
            if s.lower() in choice.lower():
                return choice[1]
        return ""
    return match[0]


def _options(sample: dict) -> dict:
    return {chr(ord("A") + i): c for i, c in enumerate(sample.get("choices") or [])}


def _mme(prediction: str, sample: dict) -> bool:
    tagged = re.search(r"<answer>(.*?)</answer>", prediction, re.DOTALL)
    pred = tagged.group(1).strip().upper() if tagged else prediction
    found = extract_characters_regex(pred)
    return found != "" and found == str(sample["answer"])


def _mathvista(prediction: str, sample: dict, extracted: str | None = None) -> bool | None:
    """MathVista's ``post_check``: with ``extracted`` None the prefetch on the raw response (None: its GPT
    extraction would be asked), else the verdict on the judge's extracted answer."""
    meta = sample.get("meta") or {}
    response = prediction if extracted is None else extracted
    if meta.get("question_type") == "multi_choice":
        choices = {chr(65 + i): v for i, v in enumerate(ast.literal_eval(meta["choices"]))}
        letter = can_infer(str(response), choices)
        if not letter:
            return None if extracted is None else False
        return letter == meta.get("answer_option", sample["answer"])
    kind, answer = meta.get("answer_type"), meta.get("answer", sample["answer"])
    try:
        if kind == "integer":
            got, want = int(response), int(answer)
        elif kind == "float":
            got, want = float(response), float(answer)
        else:  # post_check compares str(None): a free-form text / list answer never matches
            got, want = "None", str(answer)
    except ValueError:
        got, want = None, answer
    if got == want and (got or extracted is not None):
        return True  # the prefetch returns the value itself: a 0 is falsy there and goes to the judge
    return False if extracted is not None or kind not in ("integer", "float") else None


def _wemath(prediction: str, sample: dict) -> bool:
    tail = re.sub(r"[>><<:.]", "", prediction.split("Answer")[-1].strip()).strip()
    return bool(tail) and tail[0] in "ABCDEFGH" and tail[0] == str(sample["answer"])


def verdict(prediction: str, sample: dict) -> bool | None:
    """VLMEvalKit's exact-matching verdict on the raw response, or None where it would ask its GPT judge."""
    task = str(sample.get("task", ""))
    if task.startswith("MME-RealWorld"):
        return _mme(prediction, sample)
    if task.startswith("MathVista"):
        return _mathvista(prediction, sample)
    if task.startswith("WeMath"):
        return _wemath(prediction, sample)
    choices = _options(sample)
    if not choices:
        return None  # a free-form question outside the benchmarks above: VLMEvalKit judges it with a model
    letter = can_infer(prediction, choices)
    if not letter:
        return None
    return letter == str(sample["answer"])


def task_accuracy(task: str, records: list[dict]) -> float:
    """A task's accuracy from its records (``correct``, ``meta``): HRBench averages per ``cycle_category``."""
    if task.startswith("HRBench"):
        cycles = {}
        for r in records:
            cycles.setdefault((r.get("meta") or {}).get("cycle_category"), []).append(r["correct"])
        return math.fsum(sum(v) / len(v) for v in cycles.values()) / len(cycles)
    return sum(r["correct"] for r in records) / len(records)
