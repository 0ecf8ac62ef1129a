"""The capacity filter (SPEC 4.4): sample the base model N times per question; a line is hard when all miss.

Each line's attempts are drawn with seeds derived from the run seed and the
line's ``id`` (:mod:`gapkern.sampling`), so they do not depend on the other
lines of a batch, on the number of ranks, or on where a run was resumed.

Resuming (:mod:`gapkern.resumable`): results go, one line at a time, to
``OUT.parts/part-RANK.jsonl`` (next to ``OUT.parts/settings.json``, the
settings they were drawn with). A restarted run keeps every complete line,
drops a torn last line, and recomputes only the batches that miss a line.
When every line is there, rank 0 writes ``OUT`` atomically in input order
and removes ``OUT.parts``, keeping the settings in ``OUT.settings.json``: a
rerun on a finished ``OUT`` with other settings (attempts, seed, model, the
samples' content) is refused, not answered with the old lines.

Each output line is the validated input line (image paths absolute) plus
``attempts`` (the N responses), ``n_correct`` and ``hard``.
"""
from __future__ import annotations

from .scoring import is_correct
from ..errors import check_positive, check_samples
from ..resumable import ResumeError, read_lines, run_lines, samples_digest
from ..sampling import SeededSampler, derive_seed
from .responses import generate_responses

__all__ = ["derive_seed", "SeededSampler", "sample_attempts", "judge", "curate", "ResumeError"]


def sample_attempts(model, tokenizer, samples: list[dict], *, n: int = 8, temperature: float = 1.0,
                    max_new_tokens: int = 512, seed: int = 0, settings: dict | None = None,
                    suppress: list[int] | None = None) -> list[list[str]]:
    """``n`` responses per sample from one batched ``generate`` of a patched model (special tokens dropped).

    Attempt ``j`` of a line is drawn with ``derive_seed(seed, id, j)``.
    ``suppress``: token ids never sampled (the latent start of a model
    that was not trained to write latents).
    """
    responses = generate_responses(model, tokenizer, samples, n=n, temperature=temperature,
                                   max_new_tokens=max_new_tokens, seed=seed, settings=settings, suppress=suppress)
    return [[r.text for r in attempts] for attempts in responses]


def judge(sample: dict, attempts: list[str]) -> dict:
    """The output line: ``sample`` with ``attempts``, ``n_correct`` and ``hard`` (no attempt correct)."""
    n_correct = sum(is_correct(text, sample) for text in attempts)
    return {**sample, "attempts": list(attempts), "n_correct": n_correct, "hard": n_correct == 0}


def settings_file(out: str) -> str:
    """Where a finished curation keeps the settings its lines were drawn with."""
    return out + ".settings.json"


def curate(model, tokenizer, samples: list[dict], out: str, *, n: int = 8, temperature: float = 1.0,
           max_new_tokens: int = 512, batch: int = 8, seed: int = 0, settings: dict | None = None,
           suppress: list[int] | None = None, identity: dict | None = None, progress: bool | None = None,
           keep_settings: str | None = None) -> dict:
    """Curate ``samples`` (``load_samples``' output) into the JSONL file ``out``; resumes an interrupted run.

    Under torchrun each rank takes every world-th line and must call this
    with the same arguments. ``identity`` (e.g. the model path) joins the
    samples (a digest), n, temperature, max_new_tokens and seed in what a
    resumed run must match.
    ``keep_settings``: a file that keeps the finished run's settings (:func:`gapkern.resumable.run_lines`).
    Returns ``{"lines", "hard", "resumed"}`` (resumed: lines an interrupted run had finished).
    """
    check_samples(samples)
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("batch", batch)):
        check_positive(name, value)
    run = {**(identity or {}), "samples": samples_digest(samples), "n": n, "temperature": temperature,
           "max_new_tokens": max_new_tokens, "seed": seed}

    def compute(chunk):
        attempts = sample_attempts(model, tokenizer, chunk, n=n, temperature=temperature,
                                   max_new_tokens=max_new_tokens, seed=seed, settings=settings, suppress=suppress)
        return [judge(sample, texts) for sample, texts in zip(chunk, attempts)]

    resumed = run_lines(samples, out, run, compute, batch=batch, desc="curate", line_name="curated line",
                        out_name="curation", keep_settings=keep_settings or settings_file(out), progress=progress)
    hard = sum(bool(line["hard"]) for line in read_lines(out))
    return {"lines": len(samples), "hard": hard, "resumed": resumed}
