"""The latent-aware generate written the obvious way: no cache, the whole sequence recomputed every step.

The tests check :func:`~gapkern.models.qwen2_5_vl.generate.decode` against it, and the
benchmarks time the decode loop against it. Same state machine (SPEC section
3), greedy, one row at a time; the latent step is computed in float64 here,
apart from ``gapkern.ops``.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from ..models.qwen2_5_vl import hf_compat as hf


def latent_step64(hidden, head=None, tau=None, eps=1e-6):
    """SPEC section 2 for one row, in float64: ``hidden`` (D,) -> latent (D,)."""
    z = hidden.double()
    if head is not None:
        c = z @ head.weight.double() + head.bias.double()
        if head.sigma is not None:
            c = c * head.sigma.double()
        z = head.mean.double() + c @ head.basis.double().T
    if tau is not None and tau > 0:
        z = z * tau / max(z.norm().item(), eps)
    return z


def _place_latents(embeds, slots, latents):
    """``embeds`` with row ``b``'s ``latents[b]`` (n, D) at its ``n`` placeholder ``slots`` (B, L)."""
    embeds = embeds.clone()
    for b, z in enumerate(latents):
        at = slots[b].nonzero().flatten()
        if len(at) != len(z):
            raise ValueError(f"prompt_latents: row {b} has {len(at)} latent placeholders but {len(z)} latents")
        embeds[b, at] = z.to(embeds.dtype)
    return embeds


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _step_scores(scores, tokens, forced):
    """``scores`` (B, V) with HF's forced-token row (0 at the token, -inf elsewhere) for the ``forced`` rows."""
    out = scores.clone()
    for b, (tok, f) in enumerate(zip(tokens, forced)):
        if f:
            out[b] = float("-inf")
            out[b, tok] = 0.0
    return out


@torch.no_grad()
def naive_generate(model, batch: dict, gap_config, head=None, tau=None, steps: int = 16, processors=None,
                   prompt_latents=None, scores=None):
    """Greedy latent-aware generation of ``steps`` new positions for a prompt ``batch`` (the processor's output).

    ``head`` a PCALatentHead or None (output-as-input); ``tau`` per-row
    calibration targets (floats) or None; ``prompt_latents`` (a conversation
    that holds earlier spans): per row the (n, D) latents fed at the prompt's
    ``latent_pad_id`` positions, in order. Returns ``(sequences (B, L + n),
    latents: per row a float32 (n_latents, D) tensor, text_steps: per step
    whether some live row sampled a token)``. ``scores``: a list to which each
    step's (B, V) float32 scores are appended as HF's ``output_scores`` has them:
    the processed scores of a row in text mode (finished or not), HF's forced
    row (0 at the token written, -inf elsewhere) at a latent or end position.

    Both span layouts of SPEC section 3 (``gap_config.span_layout``): in the
    ``monet`` layout a row samples inside a span too; the start token it samples
    is written and latent 1 is fed at its position; later samples are written
    as the placeholder, or as the end token when it is the end token or ``K``
    latents were fed (the scores there are the forced row of the token written).
    """
    processors = LogitsProcessorList() if processors is None else processors
    lm, embed = hf.language_model(model), model.get_input_embeddings()
    input_ids, att = batch["input_ids"], batch["attention_mask"]
    rows, device = input_ids.shape[0], input_ids.device
    pad_id, eos = model.generation_config.pad_token_id or 0, _eos_ids(model)
    embeds = embed(input_ids)
    if "pixel_values" in batch:
        feats = torch.cat(hf.merger_outputs(model, batch["pixel_values"], batch["image_grid_thw"]))
        embeds = embeds.masked_scatter((input_ids == model.config.image_token_id)[..., None], feats.to(embeds.dtype))
    if prompt_latents is not None:
        embeds = _place_latents(embeds, input_ids == gap_config.latent_pad_id, prompt_latents)
    pos, _ = hf.rope_index(model, input_ids, batch["mm_token_type_ids"],
                          image_grid_thw=batch.get("image_grid_thw"), attention_mask=att)
    start, end, lpad = gap_config.latent_start_id, gap_config.latent_end_id, gap_config.latent_pad_id
    monet, budget = gap_config.span_layout == "monet", gap_config.latent_budget
    mode = ["latent" if t == start else "text" for t in input_ids[:, -1].tolist()]
    count = [budget] * rows  # gap: latents left to write; monet: latents fed in the open span
    done, latents, seq, text_steps = [False] * rows, [[] for _ in range(rows)], input_ids, []
    for _ in range(steps):
        hidden = lm(inputs_embeds=embeds, attention_mask=att, position_ids=pos).last_hidden_state[:, -1]
        step_scores = processors(seq, model.lm_head(hidden).float())
        text_steps.append(any(m == "text" and not d for m, d in zip(mode, done)))
        text_steps[-1] |= monet and any(m == "span" for m in mode)
        tokens, nxt, forced = [], [], [m not in ("text", "span") for m in mode]
        for b in range(rows):
            latent = mode[b] == "latent"
            if latent:
                count[b] = 1 if monet else count[b] - 1
                if monet or count[b] == 0:
                    mode[b] = "span" if monet else "end"
                tok = lpad
            elif mode[b] == "span":  # monet: the row samples inside its span
                sampled = int(step_scores[b].argmax())
                if sampled == end or count[b] == budget:
                    tok, mode[b] = end, "text"
                else:
                    tok, latent, count[b] = lpad, True, count[b] + 1
                forced[b] = tok != sampled
            elif mode[b] == "end":
                tok, mode[b], count[b] = end, "text", budget
            elif done[b]:
                tok = pad_id
            else:
                tok = int(step_scores[b].argmax())
                done[b] = tok in eos
                if tok == start:
                    mode[b], latent, count[b] = ("span", True, 1) if monet else ("latent", False, count[b])
            if latent:
                t = None if tau is None else tau[b]
                z = latent_step64(hidden[b], head, t, gap_config.eps).to(embeds.dtype)
                latents[b].append(z)
                nxt.append(z)
            else:
                nxt.append(embed.weight[tok])
            tokens.append(tok)
        if scores is not None:
            scores.append(_step_scores(step_scores, tokens, forced))
        seq = torch.cat([seq, torch.tensor(tokens, device=device)[:, None]], 1)
        embeds = torch.cat([embeds, torch.stack(nxt)[:, None]], 1)
        pos = torch.cat([pos, pos[:, :, -1:] + 1], 2)
        att = torch.cat([att, torch.ones(rows, 1, dtype=att.dtype, device=device)], 1)
        if all(done):
            break
    stacked = [torch.stack(z).float() if z else torch.zeros(0, embeds.shape[-1], device=device) for z in latents]
    return seq, stacked, text_steps
