"""What every sample reader shares (SPEC 4.1): the categories, the error of a malformed line, the answer's format.

Its own module so the readers (:mod:`gapkern.data.samples`, the VLMEvalKit TSV reader
:mod:`gapkern.data.benchfiles`) and the prompt protocol (:mod:`gapkern.protocol`) import it without importing each
other.
"""
from __future__ import annotations

__all__ = ["CATEGORIES", "SampleError", "ANSWER_FORMAT"]

CATEGORIES = ("perception", "reasoning")


class SampleError(ValueError):
    """A malformed sample line: the message starts with ``file:line:field``."""


ANSWER_FORMAT = {  # the last line of every question: where the answer goes (what evaluate.extract_answer reads)
    True: "Answer with the option's letter inside <answer></answer>.",
    False: "Give the final answer inside <answer></answer>.",
}
