"""How a :class:`~.decoder.Decoder`'s step runs: eagerly, through ``torch.compile``, or replayed from a CUDA graph.

The step (:meth:`~.decoder.Decoder.forward_step`) reads and writes only the
decoder's own buffers, so one capture serves every later step, text and latent
alike: :func:`capture` records it once per kept decoder (after the first
prefill, when the static cache exists) and the decoder replays it.
``compile_config`` instead runs the language model's part of the step through
``torch.compile`` (its ``mode="reduce-overhead"`` makes CUDA graphs itself).
"""
from __future__ import annotations

import torch


class StepGraph:
    """One captured decode step: ``replay()`` runs it on the decoder's buffers and returns its hidden (B, D)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, hidden: torch.Tensor):
        self.graph, self.hidden = graph, hidden

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.hidden


def compile_step(dec, options: dict | None) -> None:
    """Run the decoder's language-model forward through ``torch.compile(**options)`` (None: eagerly), as HF's
    ``compile_config`` asks; a kept decoder recompiles only for other options."""
    if options != dec.compiled_with:
        dec.forward = dec._forward if options is None else torch.compile(dec._forward, **options)
        dec.compiled_with = options


def warm_up(dec, runs: int = 2) -> None:
    """Run the step ``runs`` times and undo it: the state is restored, and the cache slot it wrote is the one
    the next real step rewrites."""
    saved = [t.clone() for t in dec.step_state()]
    for _ in range(runs):
        dec.forward_step(dec.max_len)
        for t, s in zip(dec.step_state(), saved):
            t.copy_(s)


def capture(dec) -> StepGraph:
    """Warm the step up on a side stream, then capture it in a CUDA graph (capturing records only: nothing
    runs, the state is untouched)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warm_up(dec)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        hidden = dec.forward_step(dec.max_len)
    return StepGraph(graph, hidden)
