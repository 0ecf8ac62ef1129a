"""The latent-aware decode loop of SPEC section 3, gpt-fast's shape: prefill, write_position, decode_positions.

``gap_generate`` keeps Hugging Face's ``generate``: HF prepares the generation
config, the logits processors, the stopping criteria, the lengths and the
M-RoPE positions (rope deltas computed once, at prefill), then runs
:func:`decode` as its custom decoding loop. :mod:`.generate_options` refuses,
saying why, the options this loop cannot honour.

The step's state and SPEC section 3's span rule live in :mod:`.decoder`: the
device applies the rule inside the decode step (captured and replayed by
:mod:`.graph`), the host mirror applies it to Python ints, so the host knows each row's mode without reading
the device. Only a step where some live row is in text mode runs the LM head
and reads the sampled tokens back: that read is the loop's one host sync, and
a latent span has none (unless scores are kept: then the LM head also runs
where finished rows are in text mode; or the caller's stopping criteria need
a read every step).

What HF hands the loop (it differs between releases: :mod:`.hf_compat`) is
read by :mod:`.inputs`, which also continues a caller's ``past_key_values``;
the calibration targets come from :mod:`.state`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteriaList
from transformers.generation import GenerateDecoderOnlyOutput, GenerationMixin
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from . import generate_options as options
from . import graph as step_graph
from . import hf_compat as hf
from .decoder import Decoder, HostSpans
from .inputs import Prompt, check_inputs, last_tokens, mrope, take_prompt
from .state import keep_own_norms

STATIC_BUCKET = 128  # static caches are sized in multiples of this, so a captured graph serves many lengths
GRAPH_ATTENTION = ("sdpa", "eager")  # attention kernels the decode step can take a prebuilt mask for


@dataclass
class GapGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's output plus ``latents``: per row, the (n_latents, D) float32 latents it wrote, in order."""

    latents: tuple[torch.Tensor, ...] | None = None


def _to_host(t: torch.Tensor) -> list:
    """The loop's device-to-host reads (a function so tests can count the calls)."""
    return t.tolist()


def prefill(model, cache, input_ids, attention_mask, position_ids, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, mm_encoder_outputs=None, past=0, inputs_embeds=None,
            chunk=None, collect=None, kept=None):
    """Run the prompt from position ``past`` on into ``cache`` (which holds the positions before).

    ``inputs_embeds`` (B, P, D): fed instead of the embedded ``input_ids``, and
    the image placeholders are the positions holding the image token's
    embedding (HF's rule). ``chunk``: positions per forward pass (HF's
    ``prefill_chunk_size``). ``collect``: ``output_hidden_states`` /
    ``output_attentions`` for the language model; its output (the last chunk's)
    is appended to ``kept``. Returns (last hidden (B, D), visual-embedding norms
    (N,) in prompt order, image mask (B, P - past)).
    """
    new = input_ids[:, past:]
    embed = model.get_input_embeddings()
    embeds = embed(new) if inputs_embeds is None else inputs_embeds[:, past:]
    visual = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw, mm_encoder_outputs=mm_encoder_outputs)
    norms = image_mask = None
    for kind, token, arg in (("image", model.config.image_token_id, "pixel_values"),
                             ("video", model.config.video_token_id, "pixel_values_videos")):
        feats = hf.visual_features(model, visual, kind)
        if feats is None:
            continue
        mask = new == token if inputs_embeds is None else (embeds == embed.weight[token]).all(-1)
        slots = int(mask.sum())
        if slots != feats.shape[0]:  # masked_scatter would drop extra embeddings silently
            where = "input_ids" if inputs_embeds is None else "inputs_embeds"
            raise ValueError(f"{arg}: {feats.shape[0]} {kind} embeddings for {slots} {kind} tokens in {where}")
        feats = feats.to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(mask[..., None], feats)
        if kind == "image":
            norms, image_mask = torch.linalg.vector_norm(feats.float(), dim=-1), mask
    positions, length, lm = mrope(position_ids)[..., past:], embeds.shape[1], hf.language_model(model)
    for at in range(0, length, chunk or length):
        end = min(at + (chunk or length), length)
        out = lm(inputs_embeds=embeds[:, at:end], attention_mask=attention_mask[:, :past + end],
                 position_ids=positions[..., at:end], use_cache=True, **{hf.CACHE_KEYWORD: cache}, **(collect or {}))
    if kept is not None:
        kept.append(out)
    return out.last_hidden_state[:, -1].contiguous(), norms, image_mask


def _collected(generation_config) -> dict:
    """The language model's ``output_hidden_states`` / ``output_attentions`` keywords HF's generate would pass
    (it collects them only with ``return_dict_in_generate``); empty when none is asked for."""
    gc = generation_config
    if not gc.return_dict_in_generate:
        return {}
    return {k: True for k in ("output_hidden_states", "output_attentions") if getattr(gc, k)}


def _modes(model, device, cuda_graph, static_cache, generation_config, continuing=False):
    """(static cache, CUDA graph) for this call. An explicit ``compile_config`` replaces the graph: its
    ``mode`` decides (``reduce-overhead`` makes CUDA graphs of its own). Hidden states or attentions asked
    for decode eagerly: a captured or compiled step returns only its fixed buffers."""
    attention = hf.attention_kind(model)
    if _collected(generation_config):
        compiling = generation_config.compile_config is not None and not generation_config.disable_compile
        if cuda_graph or compiling:
            options.refuse("output_hidden_states / output_attentions with cuda_graph or compile_config",
                           "a captured or compiled decode step returns only its fixed buffers, not each layer's "
                           "states; pass cuda_graph=False and no compile_config (the default then decodes eagerly)")
        cuda_graph = False
    if continuing:
        if cuda_graph or static_cache or generation_config.cache_implementation == "static":
            raise ValueError("past_key_values: a continued conversation decodes on the caller's DynamicCache; "
                             "static_cache, cuda_graph and cache_implementation='static' need a fresh prompt")
        return False, False
    compiling = generation_config.compile_config is not None and not generation_config.disable_compile
    if compiling and cuda_graph:
        raise ValueError("cuda_graph / compile_config: pass one (torch.compile's mode='reduce-overhead' makes "
                         "CUDA graphs itself)")
    on_cuda = device.type == "cuda"
    graph = on_cuda and attention in GRAPH_ATTENTION and not compiling if cuda_graph is None else bool(cuda_graph)
    if graph and not on_cuda:
        raise ValueError("cuda_graph: needs the model and inputs on a CUDA device")
    static = graph or bool(static_cache) or generation_config.cache_implementation == "static"
    if static and attention not in GRAPH_ATTENTION:
        raise ValueError(f"static_cache / cuda_graph: need attention 'sdpa' or 'eager', got {attention!r}")
    return static, graph


def _decoder(model, rows, max_len, static, graph, min_len=None):
    """The kept static decoder if it fits this call, else a new one (kept if static)."""
    gap = model.gap
    if static:
        max_len = -(-max(max_len, min_len or 0) // STATIC_BUCKET) * STATIC_BUCKET
        kept = gap.decoder
        if kept is not None and kept.made_for == Decoder.key(model, rows, max_len, static) and (
                (kept.graph is not None) == graph):
            return kept
    dec = Decoder(model, rows, max_len, static, graph)
    gap.decoder = dec if static else None  # one static decoder kept: its cache and graph are large
    return dec


def _compile(model, dec, generation_config) -> None:
    """Honour ``compile_config`` where HF's generate would compile (a static cache on a device it compiles for,
    not ``disable_compile``); HF logs why when it would not."""
    config = generation_config.compile_config
    wanted = config is not None and not generation_config.disable_compile
    step_graph.compile_step(dec, config.to_dict() if wanted and hf.compiles(model, generation_config, dec.cache)
                            else None)


def head_scores(model, hidden, seq, logits_processor):
    """The LM head's logits (B, V) float32 at ``hidden`` and the processed scores, as HF's ``_sample`` has them."""
    logits = model.lm_head(hidden).float()
    return logits, logits_processor(seq, logits)


def choose(scores, do_sample):
    """The next token of every row from its scores, as HF's ``_sample`` picks it."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


def sample(model, hidden, seq, logits_processor, do_sample):
    """The next token of every row from ``hidden`` (B, D)."""
    return choose(head_scores(model, hidden, seq, logits_processor)[1], do_sample)


class Scores:
    """``output_scores`` / ``output_logits``: one (B, V) float32 tensor per new position, as HF shapes them.

    A row that wrote the token it sampled (or, finished, would have: HF keeps
    scoring finished rows) has the processed scores / the LM head's logits; a
    latent or forced end position, and (monet layout) a position whose sampled
    token the span rule replaced by the placeholder or the end token, has HF's
    forced-token row: 0 at the token written, -inf elsewhere, so
    ``compute_transition_scores`` gives it log-probability 0.
    """

    def __init__(self, generation_config, vocab: int):
        self.scores = [] if generation_config.output_scores else None
        self.logits = [] if generation_config.output_logits else None
        self.vocab = vocab

    def add(self, tokens, text, logits=None, scores=None):
        """This position's ``tokens`` (B,); ``text`` (B,) bool the rows whose ``logits`` / ``scores`` count."""
        forced = torch.full((tokens.shape[0], self.vocab), float("-inf"), device=tokens.device)
        forced.scatter_(1, tokens[:, None], 0.0)
        for kept, computed in ((self.scores, scores), (self.logits, logits)):
            if kept is not None:
                kept.append(forced if computed is None else torch.where(text[:, None], computed, forced))

    def output(self) -> dict:
        return {"scores": None if self.scores is None else tuple(self.scores),
                "logits": None if self.logits is None else tuple(self.logits)}


@dataclass
class DecodeRun:
    """One generate call on the host: the decoder, its host mirror, the sequences and what the output collects."""

    model: object
    dec: Decoder
    prompt: Prompt
    host: HostSpans
    seq: torch.Tensor  # (B, total): the prompt's ids, then one token per new position
    length: int  # seq's columns written so far: the next position to write
    offset: int  # the KV cache's positions minus seq's (an inputs_embeds prompt without ids)
    logits_processor: object
    criteria: object  # stopping criteria besides max length and EOS (evaluated every step), or None
    do_sample: bool
    keep: bool  # return_dict_in_generate: collect the latents
    scores: Scores | None = None  # output_scores / output_logits (return_dict_in_generate)
    streamer: object = None
    trace: object = None
    visual: tuple = (None, None)  # the prompt's visual-embedding norms (N,) and image mask (B, P), from prefill
    snapshots: list = field(default_factory=list)  # each latent step's fed-back inputs (B, D)
    outputs: list | None = None  # output_hidden_states / output_attentions: the language model's output per step
    written: list = field(default_factory=list)  # per row: the snapshots holding its latents

    def finished(self) -> bool:
        return self.length == self.seq.shape[1] or self.host.finished()


def _criteria(stopping_criteria, generation_config, device):
    """(max length, EOS ids (n,), the other criteria or None) from HF's merged stopping criteria: a
    MaxLengthCriteria / EosTokenCriteria the caller passed replaces the default one."""
    lengths = [c.max_length for c in stopping_criteria if isinstance(c, MaxLengthCriteria)]
    eos = [c.eos_token_id.reshape(-1).to(device) for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
    others = [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    return (min(lengths) if lengths else generation_config.max_length,
            torch.cat(eos) if eos else torch.zeros(0, dtype=torch.long, device=device),
            StoppingCriteriaList(others) if others else None)


def _start(model, input_ids, logits_processor, stopping_criteria, generation_config, cuda_graph, static_cache,
           trace, streamer, model_kwargs) -> DecodeRun:
    """The decoder for this batch, reset for its prompt, and the host's side of the loop."""
    (rows, length), device, gc = input_ids.shape, input_ids.device, generation_config
    total, eos, others = _criteria(stopping_criteria, gc, device)
    if total <= length:
        raise ValueError(f"generate: max_length {total} leaves no room after the {length}-token prompt")
    pad_id = hf.pad_id(gc)
    prompt = take_prompt(model, input_ids, model_kwargs)
    offset = prompt.length - length
    static, use_graph = _modes(model, device, cuda_graph, static_cache, gc, prompt.past is not None)
    dec = _decoder(model, rows, total + offset, static, use_graph, gc.max_cache_len)
    last = last_tokens(model, prompt)
    collect = _collected(gc)
    dec.start(last, prompt.attention_mask, prompt.position_ids, pad_id, eos, prompt.past, collect)
    _compile(model, dec, gc)
    host = HostSpans(dec.rule, _to_host(last), pad_id, set(_to_host(eos)))
    seq = torch.full((rows, total), pad_id, dtype=input_ids.dtype, device=device)
    seq[:, :length] = input_ids
    keep = gc.return_dict_in_generate
    scores = Scores(gc, model.lm_head.weight.shape[0]) if keep and (gc.output_scores or gc.output_logits) else None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    return DecodeRun(model, dec, prompt, host, seq, length, offset, logits_processor, others, gc.do_sample, keep,
                     scores, streamer, trace, written=[[] for _ in range(rows)], outputs=[] if collect else None)


def prefill_prompt(run: DecodeRun, chunk=None):
    """Prefill the prompt into the decoder's cache; returns the last hidden (B, D) and keeps the prompt's
    visual-embedding norms on the run."""
    model, dec, prompt = run.model, run.dec, run.prompt
    hidden, norms, image_mask = prefill(model, dec.cache, prompt.input_ids, prompt.attention_mask,
                                        prompt.position_ids, past=prompt.past_len, inputs_embeds=prompt.embeds,
                                        chunk=chunk, collect=dec.collect, kept=run.outputs, **prompt.visual)
    run.visual = norms, image_mask
    return hidden


def calibrate(run: DecodeRun) -> None:
    """Set the decoder's calibration targets (SPEC section 2) from the prompt just prefilled."""
    dec, prompt = run.dec, run.prompt
    if dec.tau is not None:
        dec.tau.copy_(run.model.gap.calibration_tau(*run.visual, prompt.input_ids.shape[0], past=prompt.past))


def capture_once(run: DecodeRun) -> None:
    """Capture the decode step's CUDA graph, once per kept decoder (after the first prefill: the cache exists)."""
    if run.dec.use_graph and run.dec.graph is None:
        run.dec.graph = step_graph.capture(run.dec)


def begin(run: DecodeRun, hidden) -> list[bool]:
    """Start the loop after prefill: the trace, and the first position's inputs decided without a sample.
    Returns which rows feed a latent there."""
    if run.trace is not None:
        run.trace.begin(run.prompt.input_ids.shape[0], *run.visual)
    fed_latent = run.host.advance()
    run.dec.advance(hidden, any(fed_latent))
    return fed_latent


def _keep_latents(run: DecodeRun, fed_latent: list[bool]) -> None:
    """Remember which rows fed back a latent at this position (return_dict_in_generate)."""
    if run.keep and any(fed_latent):
        for b in (b for b, fed in enumerate(fed_latent) if fed):
            run.written[b].append(len(run.snapshots))
        run.snapshots.append(run.dec.embeds[:, 0].clone())


def write_position(run: DecodeRun, hidden, fed_latent: list[bool]) -> bool:
    """Write every row's token at the next position (the device and the host mirror already advanced to it:
    the inputs decided without a sample, ``fed_latent`` the rows that feed a latent there); returns whether
    it was a text step: some live row sampled there, and not every live row feeds a latent next (the monet
    layout samples inside a span too)."""
    dec, host = run.dec, run.host
    if run.trace is not None:
        run.trace.wrote(hidden, fed_latent, run.model.gap.head, dec.embeds[:, 0])
    sampling = host.any_live_sampling()
    logits = scores = None
    # the LM head runs only when some live row samples, or when scores are kept and some row is in text mode
    if sampling or (run.scores is not None and any(host.sampling)):
        logits, scores = head_scores(run.model, hidden, run.seq[:, :run.length], run.logits_processor)
    if sampling:
        dec.commit(choose(scores, run.do_sample))
        after_sample = host.commit(_to_host(dec.tokens))  # the monet layout's latents, chosen by the sampled token
        if any(after_sample):
            dec.write_latents(hidden)
            if run.trace is not None:
                run.trace.record(hidden, after_sample, run.model.gap.head, dec.embeds[:, 0])
            fed_latent = [a or b for a, b in zip(fed_latent, after_sample)]
    _keep_latents(run, fed_latent)
    if run.scores is not None:  # after a commit, the rows that kept their sample; else the sampling rows
        run.scores.add(dec.tokens, dec.scored if sampling else dec.sampling, logits, scores)
    run.seq[:, run.length] = dec.tokens
    run.length += 1
    if run.streamer is not None:
        run.streamer.put(torch.tensor(host.tokens))  # the host knows them: no device read
    if run.criteria is not None:
        _stop(run)
    return sampling and not all(f or d for f, d in zip(fed_latent, host.done))


def _stop(run: DecodeRun) -> None:
    """The caller's stopping criteria (stop strings, max time, ...) on the sequences so far, as HF evaluates them
    after every token: one host read per step, only when such criteria are given."""
    scores = None if run.scores is None or run.scores.scores is None else tuple(run.scores.scores)
    stopped = run.criteria(run.seq[:, :run.length], scores)
    flags = _to_host(stopped)
    if any(flags):
        run.dec.stop(stopped.to(run.dec.done.device))
        run.host.stop(flags)


def decode_positions(run: DecodeRun, hidden, fed_latent: list[bool]):
    """Step until every row is done or the sequences are full; returns the last hidden (B, D). The host
    mirror advances before each step, so a step where no row feeds a latent skips the latent step (eager)."""
    while True:
        text_step = write_position(run, hidden, fed_latent)
        if run.finished():
            return hidden
        fed_latent = run.host.advance()
        hidden = run.dec.step(run.length + run.offset, any(fed_latent))
        if run.outputs is not None:
            run.outputs.append(run.dec.outputs)
        if run.trace is not None:
            run.trace.stepped(text_step, hidden.device)


def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
           streamer=None, cuda_graph=None, static_cache=None, trace=None, **model_kwargs):
    """HF ``custom_generate`` loop: prefill, then one :meth:`Decoder.step` per new position.

    ``streamer`` gets the prompt, then every new position's tokens (latent
    placeholders and forced end tokens included), as HF's loop hands them.
    ``trace`` (a :class:`~gapkern.models.trace.StepTrace`, opt-in) times each
    step and records latent norms.
    """
    options.check_config(generation_config)
    run = _start(model, input_ids, logits_processor, stopping_criteria, generation_config, cuda_graph,
                 static_cache, trace, streamer, model_kwargs)
    hidden = prefill_prompt(run, generation_config.prefill_chunk_size)
    calibrate(run)
    capture_once(run)
    fed_latent = begin(run, hidden)
    hidden = decode_positions(run, hidden, fed_latent)
    if streamer is not None:
        streamer.end()
    return _output(run, hidden)


def _output(run: DecodeRun, hidden):
    """The sequences, or (return_dict_in_generate) HF's output with the scores, the latents and the cache to
    continue."""
    seq = run.seq[:, :run.length]
    if not run.keep:
        return seq
    rows, dec = seq.shape[0], run.dec
    stacked = torch.stack(run.snapshots) if run.snapshots else hidden.new_zeros(0, rows, hidden.shape[-1])
    latents = tuple(stacked[w, b].float() for b, w in enumerate(run.written))
    # A static cache is the kept decoder's, returned as HF returns its own (which its next call reuses too):
    # the next static generate resets and rewrites it.
    cache = dec.cache
    if run.prompt.past is None:
        keep_own_norms(cache, *run.visual, rows, seq.device)
    scores = {} if run.scores is None else run.scores.output()
    if run.outputs is not None:  # HF's layout: per new position, the language model's per-layer tuple
        for name in dec.collect:
            field_name = name.removeprefix("output_")
            scores[field_name] = tuple(getattr(out, field_name) for out in run.outputs)
    return GapGenerateOutput(sequences=seq, latents=latents, **scores, **{hf.OUTPUT_CACHE: cache})


def gap_generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 prefix_allowed_tokens_fn=None, synced_gpus=None, assistant_model=None, streamer=None,
                 negative_prompt_ids=None, negative_prompt_attention_mask=None, custom_generate=None, **kwargs):
    """Hugging Face's ``generate``, latent-aware; extra keywords ``cuda_graph``, ``static_cache``, ``trace``.

    ``cuda_graph`` (default: on for a CUDA model with sdpa / eager attention)
    decodes with a static KV cache and replays one captured CUDA graph per
    step; ``static_cache=True`` runs the same static-cache step eagerly (CPU
    too). ``trace=StepTrace()`` (opt-in: it synchronises every step) records
    per-step times and latent norms. With ``return_dict_in_generate=True`` the
    output carries ``latents``, HF's ``scores`` / ``logits`` when asked for
    (forced-token rows at latent and end positions), and the cache it decoded
    on (a static one, as HF's, is rewritten by the next static call); a dynamic
    one continues the conversation: ``past_key_values=out.past_key_values``
    (``out.cache`` on transformers 5.24+) and the whole conversation as
    ``input_ids``. HF's options are honoured or refused by name
    (:mod:`.generate_options`; README has the table).
    """
    if "gap" not in self._modules:
        raise RuntimeError("generate: this model has no GapConfig; patch it (gapkern.patch) or call set_gap")
    options.check_call(self, generation_config, assistant_model, synced_gpus, negative_prompt_ids,
                       negative_prompt_attention_mask, custom_generate, kwargs)
    check_inputs(inputs, kwargs)
    stopping_criteria = options.stop_strings(self, generation_config, stopping_criteria, kwargs)
    # HF hands a custom loop only the keywords its own loop lacks: the streamer goes in bound
    loop = decode if streamer is None else functools.partial(decode, streamer=streamer)
    return GenerationMixin.generate(self, inputs, generation_config, logits_processor, stopping_criteria,
                                    prefix_allowed_tokens_fn, custom_generate=loop, **kwargs)
