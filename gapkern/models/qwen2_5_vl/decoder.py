"""The decode step's state: SPEC section 3's span rules, the device buffers that run them, and their host mirror.

Per row the state is one counter, ``left``, and a ``done`` flag; :class:`SpanRule`
(one subclass per span layout, ``gap`` and ``monet``) is the one definition of
how they move. :class:`Decoder` applies it to (B,) tensors inside the decode
step (graph-safe: it reads and writes only its own buffers), :class:`HostSpans`
applies the same rule to Python ints, so the host knows each row's mode and
every forced token without reading the device. How the step runs (eagerly,
compiled, or replayed from a CUDA graph) is :mod:`.graph`'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from ... import ops
from . import hf_compat as hf
from .inputs import mrope


@dataclass(frozen=True)
class SpanRule:
    """SPEC section 3 for every row, written once per layout for both sides of the loop.

    A row's state is ``left`` (0 in text mode; its meaning inside a span is the
    layout's) and ``done``. The decoder applies these methods to (B,) device
    tensors with ``where=torch.where``; the host mirror to each row's Python
    ints with ``where=host_where``. Only ``==``, ``<``, ``>``, ``&``, ``|``, ``-`` and
    ``where`` are used, so both sides run the same code. A step is two phases:
    :meth:`advance` before the LM head (the positions decided without a
    sample), :meth:`commit` after it (the rows that sampled). :meth:`commit` is
    idempotent on its own output tokens: the host mirror runs it on the tokens
    it reads back and reaches the device's state.
    """

    start: int
    end: int
    placeholder: int
    budget: int

    @classmethod
    def of(cls, config) -> "SpanRule":
        rule = {"gap": GapSpans, "monet": MonetSpans}[config.span_layout]
        return rule(config.latent_start_id, config.latent_end_id, config.latent_pad_id, config.latent_budget)

    def opened(self, last, where):
        """After prefill: a prompt whose ``last`` token is the start token starts in latent mode (its latent 1
        comes from the prompt's last hidden state in both layouts)."""
        return where(last == self.start, self.budget + 1, 0)

    def forced(self, latent, end, other, where):
        """The token a row writes without sampling: the placeholder in a span, the end token after it."""
        return where(latent, self.placeholder, where(end, self.end, other))

    def stop(self, left, done, stopped, where):
        """Rows a stopping criterion ended are done and write pad from now on: a span they were in is dropped."""
        return where(stopped, 0, left), done | stopped


class GapSpans(SpanRule):
    """The ``gap`` layout: ``left`` is ``budget + 1`` once a row wrote the start token, one less every
    position; a span is start, K latents (no sampling), forced end."""

    def advance(self, left, where):
        """A new position: (latent, end, sampled, left after): the row writes a latent, the forced end token,
        or samples text there."""
        return left > 1, left == 1, left == 0, where(left > 0, left - 1, 0)

    def commit(self, left, done, sampled, token, is_eos, where):
        """Rows that ``sampled`` wrote ``token``: the start token opens a span, EOS finishes the row. Returns
        (tokens, rows that write a latent now: None, left, done)."""
        return token, None, where(sampled & (token == self.start), self.budget + 1, left), done | (sampled & is_eos)


class MonetSpans(SpanRule):
    """The ``monet`` layout (Monet's released vLLM runner): every position samples; inside a span ``left`` is
    ``budget - n + 1`` after ``n`` latents were fed (``budget + 1``: a prompt's start token, latent 1 to feed
    without sampling). A span is start (latent 1 fed at its position), placeholders, end: the end token is
    sampled, or forced after ``budget`` latents."""

    def advance(self, left, where):
        forced = left == self.budget + 1
        return forced, left < 0, left < self.budget + 1, where(forced, self.budget, left)

    def commit(self, left, done, sampled, token, is_eos, where):
        """Rows that ``sampled`` ``token``: (tokens written, rows whose next input is a latent from this step's
        hidden state, left, done)."""
        span, text = sampled & (left > 0), sampled & (left == 0)
        close = span & ((token == self.end) | (left == 1))
        more = where(close, False, span)
        opens = text & (token == self.start)
        written = where(close, self.end, where(more, self.placeholder, token))
        left = where(close, 0, where(more, left - 1, where(opens, self.budget, left)))
        return written, more | opens, left, done | (text & is_eos)


def host_where(cond, a, b):
    """``torch.where`` for one row's Python values: how the host mirror runs :class:`SpanRule`."""
    return a if cond else b


class HostSpans:
    """The host mirror: :class:`SpanRule` on Python ints, so the host knows each row's mode and every
    forced token without reading the device."""

    def __init__(self, rule: SpanRule, last: list[int], pad: int, eos: set[int]):
        self.rule, self.pad, self.eos = rule, pad, eos
        self.left = [rule.opened(t, host_where) for t in last]
        self.done = [False] * len(last)
        self.sampling = [False] * len(last)  # which rows sample at the current position
        self.tokens = [pad] * len(last)  # what each row writes at the current position

    def advance(self) -> list[bool]:
        """Mirror :meth:`Decoder.advance`; returns which rows wrote a latent."""
        steps = [self.rule.advance(n, host_where) for n in self.left]
        self.sampling = [sampling for _, _, sampling, _ in steps]
        self.left = [left for _, _, _, left in steps]
        self.tokens = [self.rule.forced(latent, end, self.pad, host_where) for latent, end, _, _ in steps]
        return [latent for latent, _, _, _ in steps]

    def any_live_sampling(self) -> bool:
        """Whether some live row samples at this position (the LM head must run)."""
        return any(s and not d for s, d in zip(self.sampling, self.done))

    def commit(self, tokens: list[int]) -> list[bool]:
        """Mirror :meth:`Decoder.commit` from the tokens it wrote (read back from the device); returns which
        rows write a latent chosen after sampling (the monet layout's)."""
        rule, eos, after_sample = self.rule, self.eos, [False] * len(tokens)
        for b, token in enumerate(tokens):
            _, latent, self.left[b], self.done[b] = rule.commit(self.left[b], self.done[b], self.sampling[b], token,
                                                                token in eos, host_where)
            after_sample[b] = bool(latent)
        self.tokens = tokens
        return after_sample

    def stop(self, stopped: list[bool]) -> None:
        """Mirror :meth:`Decoder.stop`."""
        for b, s in enumerate(stopped):
            self.left[b], self.done[b] = self.rule.stop(self.left[b], self.done[b], s, host_where)

    def finished(self) -> bool:
        return all(self.done)


class Decoder:
    """Static buffers of one decode loop; ``step`` reads and writes only these (graph-safe)."""

    def __init__(self, model, rows: int, max_len: int, static: bool, graph: bool = False):
        gap, lm = model.gap, hf.language_model(model)
        dim, device, dtype = lm.config.hidden_size, model.device, model.dtype
        cfg = gap.config
        self.config, self.lm, self.head, self.static = model.config, lm, gap.head, static
        self.rows, self.max_len, self.eps = rows, max_len, cfg.eps
        self.rule = SpanRule.of(cfg)
        self.attention = hf.attention_kind(model)
        self.embed = model.get_input_embeddings()
        self.end_embed = self.embed.weight[cfg.latent_end_id]
        self.embeds = torch.zeros(rows, 1, dim, dtype=dtype, device=device)  # next input, written in place
        self.pos = torch.zeros(3, rows, 1, dtype=torch.long, device=device)  # its M-RoPE position
        self.valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)  # attention mask over the cache
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)  # its cache column
        self.left = torch.zeros(rows, dtype=torch.long, device=device)
        self.sampling = torch.zeros(rows, dtype=torch.bool, device=device)  # rows that sample at this position
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # what this step appends
        self.scored = torch.zeros(rows, dtype=torch.bool, device=device)  # rows that wrote the token they sampled
        self.pad = torch.zeros((), dtype=torch.long, device=device)  # a tensor: the graph reads it at replay
        self.eos = torch.zeros(0, dtype=torch.long, device=device)
        self.tau = None if cfg.calibration == "none" else torch.zeros(rows, dtype=torch.float32, device=device)
        self.latent_mask = torch.zeros(rows, dtype=torch.bool, device=device)  # rows that write a latent this step
        head = self.head
        # Checked and resolved once per decoder (the basis's orthonormality, the backend, its workspaces);
        # each step then goes straight to the kernel. It reads tau, latent_mask and the head's tensors in place.
        self.latent_step = ops.bind_latent_step(
            *((None,) * 4 if head is None else (head.weight, head.bias, head.basis, head.mean)), self.tau,
            sigma=None if head is None else head.sigma, eps=self.eps, latent_mask=self.latent_mask,
            out=self.embeds[:, 0])
        self.cache = StaticCache(config=model.config, max_cache_len=max_len) if static else None
        self.use_graph, self.graph = graph, None  # a graph.StepGraph, captured after the first prefill
        self.forward, self.compiled_with = self._forward, None  # graph.compile_step sets them
        self.collect, self.outputs = {}, None  # output_hidden_states / _attentions; the last step's model output
        self.made_for = self.key(model, rows, max_len, static)

    @staticmethod
    def key(model, rows, max_len, static):
        """What a kept decoder must match to be reused: shapes, the attention kernel (it prebuilt the mask for
        it), the head and the GapConfig."""
        gap = model.gap
        return rows, max_len, static, hf.attention_kind(model), id(gap.head), tuple(gap.config.to_dict().values())

    def start(self, last, attention_mask, position_ids, pad_id, eos, past=None, collect=None):
        """Reset the state for a new batch whose prompt the next prefill writes.

        ``last`` (B,) each prompt's last token id, ``attention_mask`` (B, P) over its P positions, ``eos``
        (n,) the EOS ids (empty: none); ``past``: a caller's DynamicCache holding the conversation's start
        (dynamic decoders only); ``collect``: ``output_hidden_states`` / ``output_attentions`` for the
        language model (eager steps only), whose output each step then keeps in ``outputs``.
        """
        length = attention_mask.shape[1]
        if past is not None:
            self.cache = past
        elif self.static:
            self.cache.reset()
        else:
            self.cache = DynamicCache(config=self.config)
        self.valid.zero_()
        self.valid[:, :length] = attention_mask.bool()
        self.cache_pos.fill_(length)
        self.pos.copy_(mrope(position_ids)[:, :, -1:] + 1)
        self.left.copy_(self.rule.opened(last, torch.where))
        self.done.zero_()
        self.pad.fill_(pad_id)
        self.eos = eos
        self.collect, self.outputs = dict(collect or {}), None

    def advance(self, hidden, any_latent: bool = True):
        """Write the latents and forced end tokens that follow ``hidden`` (B, D); graph-safe. ``any_latent``
        False (the host mirror knows no row writes a latent here) skips the latent step: it would write no row."""
        out = self.embeds[:, 0]
        latent, end, sampling, left = self.rule.advance(self.left, torch.where)
        self.latent_mask.copy_(latent)
        if any_latent:
            self.latent_step(hidden)
        out.copy_(torch.where(end[:, None], self.end_embed, out))
        self.tokens.copy_(self.rule.forced(latent, end, self.pad, torch.where))
        self.sampling.copy_(sampling)
        self.left.copy_(left)

    def commit(self, sampled):
        """Append the tokens of the rows that sampled (eager, sampling steps only); finished rows write pad.
        The rows the rule puts into a latent now (monet layout) are marked in ``latent_mask``: their latent is
        :meth:`write_latents`' (the host calls it when its mirror finds such a row). ``scored``: the rows that
        wrote the token they sampled (not one the rule replaced)."""
        sampling, out = self.sampling, self.embeds[:, 0]
        token = torch.where(self.done, self.pad, sampled)
        written, latent, left, done = self.rule.commit(self.left, self.done, sampling, token,
                                                       torch.isin(token, self.eos), torch.where)
        self.scored.copy_(sampling & (written == token))
        self.tokens.copy_(torch.where(sampling, written, self.tokens))
        out.copy_(torch.where(sampling[:, None], self.embed(written), out))
        if latent is not None:
            self.latent_mask.copy_(latent)
        self.left.copy_(left)
        self.done.copy_(done)

    def write_latents(self, hidden):
        """The latents from ``hidden`` (B, D) of the rows :meth:`commit` marked (eager)."""
        self.latent_step(hidden)

    def stop(self, stopped):
        """Rows ``stopped`` (B,) bool ended by a stopping criterion (eager)."""
        left, done = self.rule.stop(self.left, self.done, stopped, torch.where)
        self.left.copy_(left)
        self.done.copy_(done)

    def _forward(self, valid):
        """The language model on the pending inputs; the final-normed hidden (B, D)."""
        mask = hf.prebuilt_mask(self.attention, valid, self.embeds.dtype)
        out = self.lm(inputs_embeds=self.embeds, attention_mask=mask, position_ids=self.pos,
                      use_cache=True, **{hf.CACHE_KEYWORD: self.cache}, **self.collect)
        if self.collect:
            if out.hidden_states:  # the first is the input embeddings: this buffer, which the next step rewrites
                out.hidden_states = (out.hidden_states[0].clone(), *out.hidden_states[1:])
            self.outputs = out
        return out.last_hidden_state[:, -1]

    def forward_step(self, kv_len: int, any_latent: bool = True):
        """Forward the pending input, then advance; returns the final-normed hidden (B, D). What a CUDA
        graph captures (``kv_len``: the cache positions the dynamic cache holds after it)."""
        self.valid.index_fill_(1, self.cache_pos, True)
        hidden = self.forward(self.valid if self.static else self.valid[:, :kv_len])
        self.pos += 1
        self.cache_pos += 1
        self.advance(hidden, any_latent)
        return hidden

    def step(self, kv_len: int, any_latent: bool = True):
        """One decode step: the captured graph's replay (its latent step always runs: one graph serves text
        and latent steps), else :meth:`forward_step`."""
        if self.graph is None:
            return self.forward_step(kv_len, any_latent)
        return self.graph.replay()

    def step_state(self) -> list[torch.Tensor]:
        """The tensors :meth:`forward_step` changes (the static cache's write positions included, not its
        keys and values): saved and restored around a warm-up."""
        layers = hf.static_lengths(self.cache)
        return [self.embeds, self.pos, self.valid, self.cache_pos, self.left, self.sampling, self.tokens, *layers]
