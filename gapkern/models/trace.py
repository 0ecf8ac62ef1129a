"""Opt-in instrumentation of the decode loop: ``model.generate(..., trace=StepTrace())``.

Without a trace the loop does no extra work and no extra host sync. With one,
every decode step is synchronised and timed, and classed as a text step (some
live row sampled a token: LM head, sampling, one host read) or a latent step
(no row sampled: the step only wrote latents or forced end tokens; in the
monet layout, which samples inside a span too: every live row feeds a latent). Per row it
also records the norms of the visual input embeddings of its prompt and of
each latent it wrote, before calibration and as fed back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTrace:
    """What one generate call did, step by step; ``on_step()`` is called after each step (progress bars)."""

    on_step: Callable[[], None] | None = None
    text_s: list[float] = field(default_factory=list)  # seconds per text step
    latent_s: list[float] = field(default_factory=list)  # seconds per latent step
    visual_norms: list[list[float]] = field(default_factory=list)  # per row: ‖e‖ at its image tokens
    raw_norms: list[list[float]] = field(default_factory=list)  # per row: ‖z‖ of each latent, before calibration
    fed_norms: list[list[float]] = field(default_factory=list)  # per row: ‖z'‖ of each latent, as fed back
    _clock: float = 0.0

    def begin(self, rows: int, norms: torch.Tensor | None, image_mask: torch.Tensor | None) -> None:
        """After prefill: the visual-embedding norms (N,) of the prompts, in prompt order."""
        self.raw_norms = [[] for _ in range(rows)]
        self.fed_norms = [[] for _ in range(rows)]
        flat = [] if norms is None else norms.tolist()
        counts = [0] * rows if image_mask is None else image_mask.sum(1).tolist()
        self.visual_norms = []
        for n in counts:
            self.visual_norms.append(flat[:n])
            flat = flat[n:]

    def wrote(self, hidden: torch.Tensor, wrote: list[bool], head, fed: torch.Tensor) -> None:
        """Rows ``wrote`` fed back latents ``fed`` (B, D) computed from ``hidden`` (B, D); restarts the clock."""
        self.record(hidden, wrote, head, fed)
        _sync(hidden.device)
        self._clock = time.perf_counter()

    def record(self, hidden: torch.Tensor, wrote: list[bool], head, fed: torch.Tensor) -> None:
        """The norms of the latents rows ``wrote`` fed back (``fed`` (B, D), from ``hidden`` (B, D))."""
        if any(wrote):
            args = (None,) * 4 if head is None else (head.weight, head.bias, head.basis, head.mean)
            sigma = None if head is None else head.sigma
            raw = torch.linalg.vector_norm(ops.latent_step(hidden, *args, None, sigma=sigma).float(), dim=-1)
            fed = torch.linalg.vector_norm(fed.float(), dim=-1)
            for b, (r, f) in enumerate(zip(raw.tolist(), fed.tolist())):
                if wrote[b]:
                    self.raw_norms[b].append(r)
                    self.fed_norms[b].append(f)

    def stepped(self, text: bool, device: torch.device) -> None:
        """One step ran since :meth:`wrote`; waits for it, then records its time."""
        _sync(device)
        (self.text_s if text else self.latent_s).append(time.perf_counter() - self._clock)
        if self.on_step is not None:
            self.on_step()
