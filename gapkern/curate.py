"""The capacity filter (SPEC 4.4): sample the base model N times per question; a line is hard when all miss.

Each line's attempts are drawn with seeds derived from the run seed and the
line's ``id`` (:class:`SeededSampler`), so they do not depend on the other
lines of a batch, on the number of ranks, or on where a run was resumed.

Resuming: results go, one line at a time, to ``OUT.parts/part-RANK.jsonl``
(next to ``OUT.parts/settings.json``, the settings they were drawn with).
A restarted run keeps every complete line, drops a torn last line, and
recomputes only the batches that miss a line (a batch is always the same
lines, so its numerics are the same too). When every line is there, rank 0
writes ``OUT`` atomically in input order and removes ``OUT.parts``.

Each output line is the validated input line (image paths absolute) plus
``attempts`` (the N responses), ``n_correct`` and ``hard``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import distributed
from ._io import atomic_write
from .evaluate import is_correct
from .prompts import prompt_batch

__all__ = ["derive_seed", "SeededSampler", "sample_attempts", "judge", "curate", "ResumeError"]


class ResumeError(ValueError):
    """OUT or OUT.parts holds something this run cannot continue (other settings, other lines, a damaged part)."""


def derive_seed(*parts) -> int:
    """A non-negative 63-bit seed from ``parts`` (the run seed and a line's id, then the attempt, ...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSampler(LogitsProcessor):
    """Draws row ``b``'s token from ``softmax(scores / temperature)`` with noise seeded by ``(seeds[b], step)``.

    Gumbel-max: ``argmax(scores / T + G)``, ``G = -log(-log(U))``, is a sample
    of that softmax. ``U`` is a function of the row's seed and its new position
    only: not of the other rows (``do_sample``'s multinomial draws the whole
    batch from one stream), nor of how many steps sampled before (the patched
    generate samples no token while every row writes latents). The returned
    scores are 0 at the drawn token and -inf elsewhere, so ``do_sample`` and
    any warper after this one can only pick it. ``temperature=0``: greedy.
    """

    def __init__(self, seeds: list[int], prompt_len: int, temperature: float = 1.0):
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        self.seeds, self.prompt_len, self.temperature = list(seeds), prompt_len, float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"scores: expected {len(self.seeds)} rows (one per seed), got {scores.shape[0]}")
        logits = scores.float()
        if self.temperature > 0:
            step = input_ids.shape[1] - self.prompt_len
            noise = torch.stack([self.uniform(derive_seed(s, step), scores.shape[1], scores.device)
                                 for s in self.seeds])
            logits = logits / self.temperature - torch.log(-torch.log(noise))
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter_(1, logits.argmax(-1, keepdim=True), 0.0)

    @staticmethod
    def uniform(seed: int, n: int, device) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        u = torch.rand(n, generator=generator, device=device)
        return u.clamp_min(torch.finfo(u.dtype).tiny)  # u = 0 would give the token -inf noise


def sample_attempts(model, tokenizer, samples: list[dict], *, n: int = 8, temperature: float = 1.0,
                    max_new_tokens: int = 512, seed: int = 0, settings: dict | None = None,
                    suppress: list[int] | None = None) -> list[list[str]]:
    """``n`` responses per sample from one batched ``generate`` of a patched model (special tokens dropped).

    Attempt ``j`` of a line is drawn with ``derive_seed(seed, id, j)``.
    ``suppress``: token ids never sampled (the latent start of a model
    that was not trained to write latents).
    """
    batch = prompt_batch(model, tokenizer, samples, settings=settings)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    prompt_len = batch["input_ids"].shape[1]
    seeds = [derive_seed(seed, sample["id"], j) for sample in samples for j in range(n)]
    sampler = SeededSampler(seeds, prompt_len, temperature)
    sequences = model.generate(**batch, do_sample=True, num_return_sequences=n, max_new_tokens=max_new_tokens,
                               logits_processor=LogitsProcessorList([sampler]), suppress_tokens=suppress or None)
    texts = tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(samples))]


def judge(sample: dict, attempts: list[str]) -> dict:
    """The output line: ``sample`` with ``attempts``, ``n_correct`` and ``hard`` (no attempt correct)."""
    n_correct = sum(is_correct(text, sample) for text in attempts)
    return {**sample, "attempts": list(attempts), "n_correct": n_correct, "hard": n_correct == 0}


class _Parts:
    """``OUT.parts/``: the run's settings and one append-only part file per rank."""

    def __init__(self, out: str, rank: int):
        self.out, self.folder = out, out + ".parts"
        self.own = os.path.join(self.folder, f"part-{rank:05d}.jsonl")

    def settle(self, settings: dict) -> None:
        """Rank 0: record the settings of a new run, or check that they are the interrupted run's."""
        path = os.path.join(self.folder, "settings.json")
        if os.path.isfile(path):
            with open(path) as f:
                before = json.load(f)
            changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            if changed:
                what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ResumeError(f"out: {self.folder!r} holds an interrupted run with other settings ({what}); "
                                  "rerun with its settings, or remove it to start over")
            return
        os.makedirs(self.folder, exist_ok=True)
        atomic_write(path, lambda tmp: _write_json(tmp, settings))

    def done(self) -> dict[str, str]:
        """id -> output line of every complete line of every part file (a torn last line is not complete)."""
        lines = {}
        for name in sorted(os.listdir(self.folder)):
            if name.startswith("part-") and name.endswith(".jsonl"):
                lines.update(_complete_lines(os.path.join(self.folder, name)))
        return lines

    def repair(self) -> None:
        """Cut this rank's part file after its last complete line (a write the kill tore)."""
        if os.path.isfile(self.own):
            with open(self.own, "rb") as f:
                data = f.read()
            os.truncate(self.own, data.rfind(b"\n") + 1)

    def append(self, line: str) -> None:
        with open(self.own, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def merge(self, samples: list[dict]) -> None:
        """Write OUT in input order from the part files, then remove them."""
        lines = self.done()
        missing = [s["id"] for s in samples if s["id"] not in lines]
        if missing:
            raise RuntimeError(f"out: {len(missing)} line(s) missing from {self.folder!r} (first: {missing[0]!r})")
        atomic_write(self.out, lambda tmp: _write_text(tmp, "".join(lines[s["id"]] for s in samples)))
        shutil.rmtree(self.folder)


def _complete_lines(path: str) -> dict[str, str]:
    with open(path, "rb") as f:
        data = f.read()
    lines = {}
    for number, raw in enumerate(data[:data.rfind(b"\n") + 1].splitlines(keepends=True), 1):
        try:
            lines[json.loads(raw)["id"]] = raw.decode("utf-8")
        except (ValueError, KeyError, TypeError):
            raise ResumeError(f"out: {path}:{number} is not a curated line; remove that file to redo its lines") \
                from None
    return lines


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _finished(out: str, samples: list[dict]) -> bool:
    """A finished OUT (no parts left) of these samples: nothing to do. Another file there is an error."""
    if not os.path.isfile(out) or os.path.isdir(out + ".parts"):
        return False
    try:
        with open(out, encoding="utf-8") as f:
            ids = [json.loads(line).get("id") for line in f if line.strip()]
    except (ValueError, AttributeError):
        ids = None
    if ids != [s["id"] for s in samples]:
        raise ResumeError(f"out: {out!r} exists and is not the curation of these samples; remove it or "
                          "choose another --out")
    return True


def curate(model, tokenizer, samples: list[dict], out: str, *, n: int = 8, temperature: float = 1.0,
           max_new_tokens: int = 512, batch: int = 8, seed: int = 0, settings: dict | None = None,
           suppress: list[int] | None = None, identity: dict | None = None, progress: bool | None = None) -> dict:
    """Curate ``samples`` (``load_samples``' output) into the JSONL file ``out``; resumes an interrupted run.

    Under torchrun each rank takes every world-th line and must call this
    with the same arguments. ``identity`` (e.g. the model path) joins the
    samples (a digest), n, temperature, max_new_tokens and seed in what a
    resumed run must match.
    Returns ``{"lines", "hard", "resumed"}`` (resumed: lines an interrupted run had finished).
    """
    from tqdm import tqdm

    rank, world = distributed.rank_world()
    if _finished(out, samples):
        return {"lines": len(samples), "hard": _count_hard(out), "resumed": len(samples)}
    parts = _Parts(out, rank)
    digest = hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()[:16]
    run = {**(identity or {}), "samples": digest, "n": n, "temperature": temperature,
           "max_new_tokens": max_new_tokens, "seed": seed}
    if rank == 0:
        parts.settle(run)
    distributed.barrier()
    parts.repair()
    done = parts.done()
    distributed.barrier()  # every rank has read the parts before any appends
    mine = samples[rank::world]
    chunks = [mine[i:i + batch] for i in range(0, len(mine), batch)]
    with tqdm(total=len(mine), initial=sum(s["id"] in done for s in mine), desc="curate", unit="line",
              disable=distributed.bar_disable(progress)) as bar:
        for chunk in chunks:
            if all(s["id"] in done for s in chunk):
                continue
            attempts = sample_attempts(model, tokenizer, chunk, n=n, temperature=temperature,
                                       max_new_tokens=max_new_tokens, seed=seed, settings=settings,
                                       suppress=suppress)
            for sample, texts in zip(chunk, attempts):
                if sample["id"] not in done:
                    parts.append(_line(judge(sample, texts)))
                    bar.update()
    distributed.barrier()
    if rank == 0:
        parts.merge(samples)
    distributed.barrier()
    resumed = sum(s["id"] in done for s in samples)
    return {"lines": len(samples), "hard": _count_hard(out), "resumed": resumed}


def _count_hard(out: str) -> int:
    with open(out, encoding="utf-8") as f:
        return sum(bool(json.loads(line)["hard"]) for line in f if line.strip())
