"""An optional judge for the lines VLMEvalKit's rules leave to its GPT judge (``gapkern eval --judge URL``).

The judge is any OpenAI-compatible chat endpoint a user runs (``URL`` is its
base, e.g. ``http://127.0.0.1:8000/v1``; ``POST URL/chat/completions``). It
is asked only about the lines :func:`gapkern.vlmeval_rules.verdict` cannot
decide, the way VLMEvalKit asks: a choice question's response is matched to
an option (its reply read by ``can_infer``; up to three tries), a MathVista
response has its answer extracted (then ``post_check``). A line whose reply
still names no option stays "needs a judge" (VLMEvalKit would draw a random
option: gapkern never guesses). Never required; never used in CI.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

__all__ = ["JudgeError", "endpoint_model", "ask", "judge_records"]

TRIES = 3


class JudgeError(RuntimeError):
    """The judge endpoint failed: the message names ``--judge`` and the URL."""


def _call(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise JudgeError(f"--judge: {url}: {exc}") from None


def endpoint_model(base: str, timeout: float = 60.0) -> str:
    """The first model the endpoint lists (``GET URL/models``)."""
    listed = _call(base.rstrip("/") + "/models", None, timeout)
    try:
        return str(listed["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"--judge: {base.rstrip('/')}/models lists no model; give --judge-model") from None


def ask(base: str, model: str, prompt: str, *, temperature: float = 0.0, timeout: float = 60.0) -> str:
    """The endpoint's reply to one user message."""
    url = base.rstrip("/") + "/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": temperature,
            "max_tokens": 128}
    reply = _call(url, body, timeout)
    try:
        return str(reply["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"--judge: {url}: expected an OpenAI chat completion, got {str(reply)[:200]!r}") from None


def _options(sample: dict) -> dict:
    return {chr(ord("A") + i): str(c) for i, c in enumerate(sample.get("choices") or [])}


def match_prompt(sample: dict, response: str) -> str:
    """Ask which option a response means (VLMEvalKit's option matching; Z: none of them)."""
    options = " ".join(f"{k}. {v}" for k, v in _options(sample).items())
    letters = ", ".join(_options(sample))
    return ("Match a model's answer to a single-choice question with the option it means. Reply with one "
            f"uppercase letter among {letters}, or Z when the answer means none of the options.\n"
            f"Question: {sample['question']}\nOptions: {options}\nAnswer: {response}\nYour output: ")


def extract_prompt(sample: dict, response: str) -> str:
    """Ask for the final answer inside a MathVista response (VLMEvalKit's answer extraction)."""
    return ("Read a model's response to a math question and reply with its final answer only: a number, "
            "or the text of the option it picks, nothing else.\n"
            f"Question: {sample['question']}\nModel response: {response}\nExtracted answer: ")


def judge_records(records: list[dict], samples: list[dict], base: str, model: str, *,
                  timeout: float = 60.0) -> int:
    """Ask the judge about every record with ``needs_judge``; set its ``correct``, ``needs_judge`` and ``judge``
    (the replies) in place. Returns how many lines the judge decided."""
    from .vlmeval_rules import _mathvista, can_infer

    by_id = {s["id"]: s for s in samples}
    decided = 0
    for record in records:
        if not record.get("needs_judge"):
            continue
        sample, response = by_id[record["id"]], record["prediction"]
        replies, verdict = [], None
        if str(sample.get("task", "")).startswith("MathVista"):
            replies.append(ask(base, model, extract_prompt(sample, response), timeout=timeout).strip())
            verdict = _mathvista(response, sample, extracted=replies[-1])
        elif sample.get("choices"):
            for _ in range(TRIES):
                replies.append(ask(base, model, match_prompt(sample, response), timeout=timeout))
                letter = can_infer(replies[-1], _options(sample))
                if letter:
                    verdict = letter == str(sample["answer"])
                    break
        record["judge"] = replies
        if verdict is not None:
            record.update(correct=bool(verdict), needs_judge=False)
            decided += 1
    return decided
