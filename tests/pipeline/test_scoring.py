"""Answer extraction, judging and scoring (SPEC 4.6, gapkern.stages.scoring), case by case."""
from __future__ import annotations

import pytest

from gapkern.stages.scoring import extract_answer, is_correct, parse_number, score

CHOICES = ["red", "green", "blue", "gray"]
MC = {"answer": "B", "choices": CHOICES}

EXTRACTION = [
    ("B", "B"),
    ("<think>small ring</think><answer>B</answer>", "B"),
    ("<answer>A</answer> wait, no: <answer> C </answer>", "C"),
    ("<answer>\nthe green one\n</answer>\ntrailing", "the green one"),
    ("<ANSWER>D</ANSWER>", "D"),
    ("Let me look.\nThe ring is green.\n\n  B  \n\n", "B"),
    ("<answer>B", "<answer>B"),  # never closed: falls back to the last line
    ("", ""),
    ("   \n\n", ""),
]


@pytest.mark.parametrize("text, expected", EXTRACTION, ids=[repr(t)[:40] for t, _ in EXTRACTION])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


MULTIPLE_CHOICE = [
    ("B", True), ("b", True), ("(B)", True), ("B.", True), ("**B**", True), ("(b)", True),
    ("answer: B", True), ("Answer: B) green", True), ("The answer is B.", True),
    ("I think B", True),          # "I" is not among the 4 choices' letters
    ("option E", False),          # E is not a choice letter
    ("green", True), ("Green.", True), ('"green"', True), ("  GREEN  ", True),
    ("green ring", False),        # not equal to a choice's text
    ("C", False), ("The answer is C, not B", False),  # the first standalone letter counts
    ("<answer>A</answer>\n<answer>B</answer>", True),
    ("<think>B is tempting</think><answer>C</answer>", False),
    ("there is no answer here", False),
    ("", False),
]


@pytest.mark.parametrize("prediction, expected", MULTIPLE_CHOICE, ids=[repr(p) for p, _ in MULTIPLE_CHOICE])
def test_multiple_choice(prediction, expected):
    assert is_correct(prediction, MC) is expected


def test_choice_text_that_is_ambiguous_without_punctuation_picks_nothing():
    sample = {"answer": "B", "choices": ["-1", "1", "0"]}
    assert is_correct("1", sample)        # exact text match wins
    assert is_correct("<answer>B</answer>", sample)
    assert not is_correct("-1", sample)   # exact match of choice A
    assert not is_correct("'1'.", {"answer": "B", "choices": ["-1.", "1", "0"]})  # loose: both -1. and 1 match


NUMBERS = [
    (42, "42", True), (42, "The answer is 42.", True), (42, "<answer>42 apples</answer>", True),
    (42, "41 or 42", True), (42, "42 or 41", False), (42, "forty-two", False),
    (1234567, "1,234,567", True), (1234567, "about 1,234,567 people", True), ("1,234", "1234", True),
    (1200.5, "$1,200.50", True), (-3.5, "x = -3.5 cm", True), (-3.5, "3.5", False),
    (-7, "\u22127", True), (0.5, ".5", True), (0.25, "25%", False), (25, "25%", True),
    (3, "pages 2-3", True), (5000, "5e3 m", True), (2.0, "2", True), (2, "2.0000001", True),
    (2, "2.00001", False), (0, "0", True), (0, "zero", False), ("3.14", "pi is about 3.14", True),
    (12, "v12", False), (7, "no number", False), (7, "", False),
]


@pytest.mark.parametrize("answer, prediction, expected", NUMBERS, ids=[f"{a!r}-{p!r}" for a, p, _ in NUMBERS])
def test_numbers(answer, prediction, expected):
    assert is_correct(prediction, {"answer": answer}) is expected


def test_parse_number_takes_the_last_number():
    assert parse_number("1,2,3") == 3.0          # not a thousands group: a list
    assert parse_number("1.2.3") == 1.2
    assert parse_number("H2O weighs 18") == 18.0
    assert parse_number("none") is None


FREE_TEXT = [
    ("New York", "new york", True), ("New York", "New-York!", True), ("New York", "  new   york. ", True),
    ("New York", "<answer>NEW YORK</answer>", True), ("New York", "York", False), ("cat", "a cat", False),
    ("3 cm", "3cm", False), ("it's", "its", False), ("it's", "it s", True),
]


@pytest.mark.parametrize("answer, prediction, expected", FREE_TEXT, ids=[f"{a!r}-{p!r}" for a, p, _ in FREE_TEXT])
def test_free_text(answer, prediction, expected):
    assert is_correct(prediction, {"answer": answer}) is expected


def test_score_accuracy_per_task_and_category_means():
    records = ([{"task": "hr", "category": "perception", "correct": c} for c in (True, False, True, True)]
               + [{"task": "star", "category": "perception", "correct": c} for c in (False, True)]
               + [{"task": "vista", "category": "reasoning", "correct": c} for c in (True, False, False)])
    result = score(records)
    assert result["tasks"] == {"hr": 0.75, "star": 0.5, "vista": pytest.approx(1 / 3)}
    assert result["counts"] == {"hr": 4, "star": 2, "vista": 3}
    assert result["categories"] == {"hr": "perception", "star": "perception", "vista": "reasoning"}
    assert result["avg_p"] == pytest.approx((0.75 + 0.5) / 2)  # the mean over tasks, not over lines (5/6)
    assert result["avg_r"] == pytest.approx(1 / 3)


def test_score_without_a_category_gives_none():
    result = score([{"task": "hr", "category": "perception", "correct": True}])
    assert result == {"tasks": {"hr": 1.0}, "counts": {"hr": 1}, "categories": {"hr": "perception"}, "avg_p": 1.0,
                      "avg_r": None}
    assert score([]) == {"tasks": {}, "counts": {}, "categories": {}, "avg_p": None, "avg_r": None}


@pytest.mark.parametrize("record, message", [
    ({"category": "perception", "correct": True}, r"records\[1\]: 'task' must be a non-empty str"),
    ({"task": "x", "category": "vision", "correct": True}, r"records\[1\]: 'category' must be one of"),
    ({"task": "x", "category": "perception", "correct": 1}, r"records\[1\]: 'correct' must be a bool"),
    ({"task": "x", "category": "reasoning", "correct": True}, "task 'x' is perception in earlier records"),
])
def test_score_rejects_bad_records(record, message):
    with pytest.raises(ValueError, match=message):
        score([{"task": "x", "category": "perception", "correct": True}, record])


def test_bad_arguments():
    with pytest.raises(TypeError, match="text: expected a str"):
        extract_answer(None)
    with pytest.raises(ValueError, match="sample: expected a dict with an 'answer'"):
        is_correct("B", {"choices": CHOICES})
