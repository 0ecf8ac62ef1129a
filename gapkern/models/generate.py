"""The latent-aware decode loop of SPEC section 3, gpt-fast style: prefill, next_token, decode_n_tokens.

``gap_generate`` keeps Hugging Face's ``generate``: HF prepares the generation
config, the logits processors, the lengths and the M-RoPE positions (rope
deltas computed once, at prefill), then runs :func:`decode` as its custom
decoding loop.

Per row the state is one counter, ``left``, and a ``done`` flag; :class:`SpanRule`
is the one definition of how they move. The device applies it to (B,) tensors
inside the (captured) decode step; the host applies the same rule to Python
ints (:class:`_Rows`), so it knows each row's mode and every forced token
without reading the device. Only a step where some live row is in text mode
runs the LM head and reads the sampled tokens back: that read is the loop's
one host sync, and a latent span has none.

What HF hands the loop (it differs between releases: :mod:`.hf_compat`) is
read by :mod:`.loop_inputs`, which also continues a caller's ``past_key_values``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache
from transformers.generation import GenerateDecoderOnlyOutput, GenerationMixin
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from .. import ops
from . import hf_compat as hf
from .loop_inputs import OWN_NORMS, Prompt, check_inputs, mrope, own_norms, take_prompt, targets

STATIC_BUCKET = 128  # static caches are sized in multiples of this, so a captured graph serves many lengths
GRAPH_ATTENTION = ("sdpa", "eager")  # attention kernels the decode step can take a prebuilt mask for


@dataclass
class GapGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's output plus ``latents``: per row, the (n_latents, D) float32 latents it wrote, in order."""

    latents: tuple[torch.Tensor, ...] | None = None


def _to_host(t: torch.Tensor) -> list:
    """The loop's only device-to-host read (a function so tests can count the calls)."""
    return t.tolist()


@dataclass(frozen=True)
class SpanRule:
    """SPEC section 3 for every row, written once for both sides of the loop.

    A row's state is ``left`` (0 in text mode, ``budget + 1`` once it wrote the
    start token, one less every step) and ``done``. The decoder applies these
    methods to (B,) device tensors with ``where=torch.where``; the host mirror
    to each row's Python ints with ``where=_pick``. Only ``==``, ``>``, ``&``,
    ``|`` and ``where`` are used, so both sides run the same code.
    """

    start: int
    end: int
    placeholder: int
    budget: int

    @classmethod
    def of(cls, config) -> "SpanRule":
        return cls(config.latent_start_id, config.latent_end_id, config.latent_pad_id, config.latent_budget)

    def opened(self, left, text, token, where):
        """After a row in text mode wrote ``token``: the start token opens a span of ``budget`` latents."""
        return where(text & (token == self.start), self.budget + 1, left)

    def advance(self, left, where):
        """A new position: (latent, end, text, left after): the row writes a latent, the forced end token,
        or samples text there."""
        return left > 1, left == 1, left == 0, where(left > 0, left - 1, 0)

    def forced(self, latent, end, other, where):
        """The token a row writes without sampling: the placeholder in a span, the end token after it."""
        return where(latent, self.placeholder, where(end, self.end, other))

    def commit(self, left, done, text, token, is_eos, where):
        """Rows in text mode wrote ``token``: the start token opens a span, EOS finishes the row."""
        return self.opened(left, text, token, where), done | (text & is_eos)


def _pick(cond, a, b):
    """``torch.where`` for one row's Python values: how the host mirror runs :class:`SpanRule`."""
    return a if cond else b


class _Rows:
    """The host mirror: :class:`SpanRule` on Python ints, so the host knows each row's mode and every
    forced token without reading the device."""

    def __init__(self, rule: SpanRule, last: list[int], pad: int, eos: set[int]):
        self.rule, self.pad, self.eos = rule, pad, eos
        self.left = [rule.opened(0, True, t, _pick) for t in last]
        self.done = [False] * len(last)
        self.text = [False] * len(last)
        self.tokens = [pad] * len(last)

    def advance(self) -> list[bool]:
        """Mirror :meth:`Decoder.advance`; returns which rows wrote a latent."""
        steps = [self.rule.advance(n, _pick) for n in self.left]
        self.text = [text for _, _, text, _ in steps]
        self.left = [left for _, _, _, left in steps]
        self.tokens = [self.rule.forced(latent, end, self.pad, _pick) for latent, end, _, _ in steps]
        return [latent for latent, _, _, _ in steps]

    def sampling(self) -> bool:
        """Whether some live row writes text at this position (the LM head must run)."""
        return any(t and not d for t, d in zip(self.text, self.done))

    def commit(self, tokens: list[int]) -> None:
        """Mirror :meth:`Decoder.commit` from the tokens it wrote (read back from the device)."""
        rule, eos = self.rule, self.eos
        for b, tok in enumerate(tokens):
            self.left[b], self.done[b] = rule.commit(self.left[b], self.done[b], self.text[b], tok, tok in eos, _pick)
        self.tokens = tokens

    def finished(self) -> bool:
        return all(self.done)


class Decoder:
    """Static buffers of one decode loop; ``step`` reads and writes only these (graph-safe)."""

    def __init__(self, model, rows: int, max_len: int, static: bool, graph: bool = False):
        gap, lm = model.gap, model.model.language_model
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
        self.cur = torch.zeros(1, dtype=torch.long, device=device)  # its cache column
        self.left = torch.zeros(rows, dtype=torch.long, device=device)
        self.text = torch.zeros(rows, dtype=torch.bool, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # what this step appends
        self.pad = torch.zeros((), dtype=torch.long, device=device)  # a tensor: the graph reads it at replay
        self.tau = None if cfg.calibration == "none" else torch.zeros(rows, dtype=torch.float32, device=device)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len) if static else None
        self.use_graph, self.graph, self.hidden = graph, None, None  # the graph is captured after the first prefill
        self.made_for = self.key(model, rows, max_len, static)

    @staticmethod
    def key(model, rows, max_len, static):
        """What a kept decoder must match to be reused: shapes, the attention kernel (it prebuilt the mask for
        it), the head and the GapConfig."""
        gap = model.gap
        return rows, max_len, static, hf.attention_kind(model), id(gap.head), tuple(gap.config.to_dict().values())

    def start(self, input_ids, attention_mask, position_ids, pad_id, eos, past=None):
        """Reset the state for a new batch whose prompt the next :func:`prefill` writes.

        ``eos`` (n,) the EOS ids (empty: none); ``past``: a caller's DynamicCache holding the
        conversation's start (dynamic decoders only).
        """
        length = input_ids.shape[1]
        if past is not None:
            self.cache = past
        elif self.static:
            self.cache.reset()
        else:
            self.cache = DynamicCache(config=self.config)
        self.valid.zero_()
        self.valid[:, :length] = attention_mask.bool()
        self.cur.fill_(length)
        self.pos.copy_(mrope(position_ids)[:, :, -1:] + 1)
        self.left.copy_(self.rule.opened(0, True, input_ids[:, -1], torch.where))
        self.done.zero_()
        self.pad.fill_(pad_id)
        self.eos = eos

    def advance(self, hidden):
        """Write the latents and forced end tokens that follow ``hidden`` (B, D); graph-safe."""
        out = self.embeds[:, 0]
        latent, end, text, left = self.rule.advance(self.left, torch.where)
        head = self.head
        args = (None,) * 4 if head is None else (head.weight, head.bias, head.basis, head.mean)
        ops.latent_step(hidden, *args, self.tau, sigma=None if head is None else head.sigma, eps=self.eps,
                        latent_mask=latent, out=out)
        out.copy_(torch.where(end[:, None], self.end_embed, out))
        self.tokens.copy_(self.rule.forced(latent, end, self.pad, torch.where))
        self.text.copy_(text)
        self.left.copy_(left)

    def commit(self, sampled):
        """Append the sampled tokens of the text rows (eager, text steps only); finished rows write pad."""
        text, out = self.text, self.embeds[:, 0]
        tok = torch.where(self.done, self.pad, sampled)
        self.tokens.copy_(torch.where(text, tok, self.tokens))
        out.copy_(torch.where(text[:, None], self.embed(tok), out))
        left, done = self.rule.commit(self.left, self.done, text, tok, torch.isin(tok, self.eos), torch.where)
        self.left.copy_(left)
        self.done.copy_(done)

    def _mask(self, valid):
        if self.attention == "sdpa":
            return {"full_attention": valid[:, None, None, :]}
        if self.attention == "eager":
            bias = torch.zeros(valid.shape, dtype=self.embeds.dtype, device=valid.device)
            return {"full_attention": bias.masked_fill(~valid, torch.finfo(bias.dtype).min)[:, None, None, :]}
        return valid.long()  # other kernels build their own mask from the 2-D one (eager path only)

    def decode_one(self, kv_len: int):
        """Forward the pending input, then advance; returns the final-normed hidden (B, D)."""
        self.valid.index_fill_(1, self.cur, True)
        valid = self.valid if self.static else self.valid[:, :kv_len]
        out = self.lm(inputs_embeds=self.embeds, attention_mask=self._mask(valid), position_ids=self.pos,
                      use_cache=True, **{hf.CACHE_KEYWORD: self.cache})
        self.pos += 1
        self.cur += 1
        hidden = out.last_hidden_state[:, -1]
        self.advance(hidden)
        return hidden

    def step(self, kv_len: int):
        if self.graph is None:
            return self.decode_one(kv_len)
        self.graph.replay()
        return self.hidden

    def _state(self):
        layers = hf.static_lengths(self.cache)
        return [self.embeds, self.pos, self.valid, self.cur, self.left, self.text, self.tokens, *layers]

    def warm_up(self, runs: int = 2):
        """Run ``decode_one`` and undo it: the state is restored, and the cache slot it
        wrote is the one the next real step rewrites."""
        saved = [t.clone() for t in self._state()]
        for _ in range(runs):
            self.decode_one(self.max_len)
            for t, s in zip(self._state(), saved):
                t.copy_(s)

    def capture(self):
        """Capture ``decode_one`` in a CUDA graph; text and latent steps replay the same graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.warm_up()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records only: nothing runs, the state is untouched
            self.hidden = self.decode_one(self.max_len)
        self.graph = graph


def prefill(model, cache, input_ids, attention_mask, position_ids, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, mm_encoder_outputs=None, past=0):
    """Run the prompt from position ``past`` on into ``cache`` (which holds the positions before).

    Returns (last hidden (B, D), visual-embedding norms (N,) in prompt order, image mask (B, L - past)).
    """
    new = input_ids[:, past:]
    embeds = model.get_input_embeddings()(new)
    visual = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw, mm_encoder_outputs=mm_encoder_outputs)
    norms = image_mask = None
    for kind, token, arg in (("image", model.config.image_token_id, "pixel_values"),
                             ("video", model.config.video_token_id, "pixel_values_videos")):
        feats = hf.visual_features(model, visual, kind)
        if feats is None:
            continue
        mask = new == token
        slots = int(mask.sum())
        if slots != feats.shape[0]:  # masked_scatter would drop extra embeddings silently
            raise ValueError(f"{arg}: {feats.shape[0]} {kind} embeddings for {slots} {kind} tokens in input_ids")
        feats = feats.to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(mask[..., None], feats)
        if kind == "image":
            norms, image_mask = torch.linalg.vector_norm(feats.float(), dim=-1), mask
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     position_ids=mrope(position_ids)[..., past:], use_cache=True,
                                     **{hf.CACHE_KEYWORD: cache})
    return out.last_hidden_state[:, -1].contiguous(), norms, image_mask


def _check_supported(generation_config, stopping_criteria, model_kwargs):
    unsupported = {
        "num_beams > 1": generation_config.num_beams > 1,
        "output_scores / output_logits": generation_config.output_scores or generation_config.output_logits,
        "output_attentions / output_hidden_states":
            generation_config.output_attentions or generation_config.output_hidden_states,
        "inputs_embeds (pass input_ids)": model_kwargs.get("inputs_embeds") is not None,
        "stopping criteria other than max length / EOS":
            any(not isinstance(c, (MaxLengthCriteria, EosTokenCriteria)) for c in stopping_criteria),
    }
    for what, used in unsupported.items():
        if used:
            raise NotImplementedError(f"generate: {what} is not supported by the latent-aware generate")


def _decoder(model, rows, max_len, static, graph):
    gap = model.gap
    if static:
        max_len = -(-max_len // STATIC_BUCKET) * STATIC_BUCKET
        kept = gap.decoder
        if kept is not None and kept.made_for == Decoder.key(model, rows, max_len, static) and (
                (kept.graph is not None) == graph):
            return kept
    dec = Decoder(model, rows, max_len, static, graph)
    gap.decoder = dec if static else None  # one static decoder kept: its cache and graph are large
    return dec


def _modes(model, device, cuda_graph, static_cache, generation_config, continuing=False):
    attention = hf.attention_kind(model)
    if continuing:
        if cuda_graph or static_cache or generation_config.cache_implementation == "static":
            raise ValueError("past_key_values: a continued conversation decodes on the caller's DynamicCache; "
                             "static_cache, cuda_graph and cache_implementation='static' need a fresh prompt")
        return False, False
    on_cuda = device.type == "cuda"
    graph = on_cuda and attention in GRAPH_ATTENTION if cuda_graph is None else bool(cuda_graph)
    if graph and not on_cuda:
        raise ValueError("cuda_graph: needs the model and inputs on a CUDA device")
    static = graph or bool(static_cache) or generation_config.cache_implementation == "static"
    if static and attention not in GRAPH_ATTENTION:
        raise ValueError(f"static_cache / cuda_graph: need attention 'sdpa' or 'eager', got {attention!r}")
    return static, graph


def sample(model, hidden, seq, logits_processor, do_sample):
    """The next token of every row from ``hidden`` (B, D), as HF's ``_sample`` picks it."""
    scores = logits_processor(seq, model.lm_head(hidden).float())
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


@dataclass
class _Loop:
    """One generate call on the host: the decoder, its host mirror, the sequences and what the output collects."""

    model: object
    dec: Decoder
    prompt: Prompt
    rows: _Rows
    seq: torch.Tensor  # (B, total): the prompt, then one token per new position
    new: int  # the next position of seq to write
    logits_processor: object
    do_sample: bool
    keep: bool  # return_dict_in_generate: collect the latents
    trace: object = None
    visual: tuple = (None, None)  # the prompt's visual-embedding norms (N,) and image mask (B, L), from prefill
    snapshots: list = field(default_factory=list)  # each latent step's fed-back inputs (B, D)
    written: list = field(default_factory=list)  # per row: the snapshots holding its latents

    def finished(self) -> bool:
        return self.new == self.seq.shape[1] or self.rows.finished()


def _start(model, input_ids, logits_processor, stopping_criteria, generation_config, cuda_graph, static_cache,
           trace, model_kwargs) -> _Loop:
    """The decoder for this batch, reset for its prompt, and the host's side of the loop."""
    rows, length = input_ids.shape
    device = input_ids.device
    # HF's merged criteria: a MaxLengthCriteria / EosTokenCriteria the caller passed replaces the default one
    lengths = [c.max_length for c in stopping_criteria if isinstance(c, MaxLengthCriteria)]
    total = min(lengths) if lengths else generation_config.max_length
    if total <= length:
        raise ValueError(f"generate: max_length {total} leaves no room after the {length}-token prompt")
    eos = [c.eos_token_id.reshape(-1).to(device) for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
    eos = torch.cat(eos) if eos else torch.zeros(0, dtype=torch.long, device=device)
    pad_id = hf.pad_id(generation_config)
    prompt = take_prompt(model, input_ids, model_kwargs)
    static, graph = _modes(model, device, cuda_graph, static_cache, generation_config, prompt.past is not None)
    dec = _decoder(model, rows, total, static, graph)
    dec.start(input_ids, prompt.attention_mask, prompt.position_ids, pad_id, eos, prompt.past)
    host = _Rows(dec.rule, _to_host(input_ids[:, -1]), pad_id, set(_to_host(eos)))
    seq = torch.full((rows, total), pad_id, dtype=input_ids.dtype, device=device)
    seq[:, :length] = input_ids
    return _Loop(model, dec, prompt, host, seq, length, logits_processor, generation_config.do_sample,
                 generation_config.return_dict_in_generate, trace, written=[[] for _ in range(rows)])


def prefill_prompt(loop: _Loop):
    """Prefill the prompt, set the calibration targets, capture the graph once, write the first position's
    latent inputs; returns the last hidden (B, D)."""
    model, dec, prompt = loop.model, loop.dec, loop.prompt
    rows = prompt.input_ids.shape[0]
    hidden, norms, image_mask = prefill(model, dec.cache, prompt.input_ids, prompt.attention_mask,
                                        prompt.position_ids, past=prompt.past_len, **prompt.visual)
    loop.visual = norms, image_mask
    if dec.tau is not None:
        dec.tau.copy_(targets(model.gap, prompt, norms, image_mask, rows))
    if dec.use_graph and dec.graph is None:
        dec.capture()
    if loop.trace is not None:
        loop.trace.begin(rows, norms, image_mask)
    dec.advance(hidden)
    return hidden


def next_token(loop: _Loop, hidden) -> bool:
    """Write every row's token at the next position (the device already wrote the latent rows' inputs);
    returns whether some live row sampled text there."""
    dec, rows = loop.dec, loop.rows
    wrote = rows.advance()
    if loop.trace is not None:
        loop.trace.wrote(hidden, wrote, loop.model.gap.head, dec.embeds[:, 0])
    if loop.keep and any(wrote):
        for b in (b for b, w in enumerate(wrote) if w):
            loop.written[b].append(len(loop.snapshots))
        loop.snapshots.append(dec.embeds[:, 0].clone())
    text = rows.sampling()
    if text:  # LM head and sampling only when some live row writes text
        dec.commit(sample(loop.model, hidden, loop.seq[:, :loop.new], loop.logits_processor, loop.do_sample))
        rows.commit(_to_host(dec.tokens))
    loop.seq[:, loop.new] = dec.tokens
    loop.new += 1
    return text


def decode_n_tokens(loop: _Loop, hidden):
    """Step until every row is done or the sequences are full; returns the last hidden (B, D)."""
    while True:
        text = next_token(loop, hidden)
        if loop.finished():
            return hidden
        hidden = loop.dec.step(loop.new)
        if loop.trace is not None:
            loop.trace.stepped(text, hidden.device)


def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
           streamer=None, cuda_graph=None, static_cache=None, trace=None, **model_kwargs):
    """HF ``custom_generate`` loop: prefill, then one :meth:`Decoder.step` per new position.

    ``trace`` (a :class:`~gapkern.models.trace.StepTrace`, opt-in) times each step and records latent norms.
    """
    _check_supported(generation_config, stopping_criteria, model_kwargs)
    loop = _start(model, input_ids, logits_processor, stopping_criteria, generation_config, cuda_graph,
                  static_cache, trace, model_kwargs)
    hidden = decode_n_tokens(loop, prefill_prompt(loop))
    return _output(loop, hidden)


def _output(loop: _Loop, hidden):
    """The sequences, or (return_dict_in_generate) HF's output with the latents and the cache to continue."""
    seq = loop.seq[:, :loop.new]
    if not loop.keep:
        return seq
    rows, dec = seq.shape[0], loop.dec
    stacked = torch.stack(loop.snapshots) if loop.snapshots else hidden.new_zeros(0, rows, hidden.shape[-1])
    latents = tuple(stacked[w, b].float() for b, w in enumerate(loop.written))
    cache = None if dec.static else dec.cache  # a static cache is the kept decoder's: the next call rewrites it
    if cache is not None and loop.prompt.past is None:
        setattr(cache, OWN_NORMS, own_norms(*loop.visual, rows, seq.device))
    return GapGenerateOutput(sequences=seq, latents=latents, **{hf.OUTPUT_CACHE: cache})


def gap_generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 prefix_allowed_tokens_fn=None, synced_gpus=None, assistant_model=None, streamer=None,
                 negative_prompt_ids=None, negative_prompt_attention_mask=None, custom_generate=None, **kwargs):
    """Hugging Face's ``generate``, latent-aware; extra keywords ``cuda_graph``, ``static_cache``, ``trace``.

    ``cuda_graph`` (default: on for a CUDA model with sdpa / eager attention)
    decodes with a static KV cache and replays one captured CUDA graph per
    step; ``static_cache=True`` runs the same static-cache step eagerly (CPU
    too). ``trace=StepTrace()`` (opt-in: it synchronises every step) records
    per-step times and latent norms. With ``return_dict_in_generate=True`` the
    output carries ``latents``, and (dynamic cache) the cache to continue the
    conversation with: ``past_key_values=out.past_key_values`` (``out.cache``
    on transformers 5.24+) and the whole conversation as ``input_ids``.
    """
    if "gap" not in self._modules:
        raise RuntimeError("generate: this model has no GapConfig; patch it (gapkern.patch) or call set_gap")
    if custom_generate is not None:
        raise ValueError("custom_generate: the latent-aware generate is itself a custom decoding loop")
    for name, value in (("assistant_model", assistant_model), ("streamer", streamer), ("synced_gpus", synced_gpus)):
        if value:
            raise NotImplementedError(f"generate: {name} is not supported by the latent-aware generate")
    check_inputs(inputs, kwargs)
    return GenerationMixin.generate(
        self, inputs, generation_config, logits_processor, stopping_criteria, prefix_allowed_tokens_fn,
        negative_prompt_ids=negative_prompt_ids, negative_prompt_attention_mask=negative_prompt_attention_mask,
        custom_generate=decode, **kwargs)
