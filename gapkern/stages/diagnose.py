"""The norm-gap diagnosis (SPEC 4.7): how far hidden states and latents sit from the input embeddings' norm.

- :func:`hidden_norms`: over the prompts of a sample file, the mean L2 norm
  of the input embeddings at text positions and at visual positions (the
  merger outputs at image tokens), and of every layer's hidden states at the
  same positions: before the final norm (each decoder layer's output), and
  after it for the last layer.
- :func:`latent_norms`: the latents a patched model's ``generate`` writes,
  before calibration and as fed back (``StepTrace``), per calibration mode.
- :func:`diagnose`: both, with ratios: each hidden norm over the matching
  input norm, the latents' over the visual input norm. Output-as-input
  models (Monet-7B) measure text ~546x, visual ~8.7x in the paper.
- :func:`write_diagnosis` (JSON and PNG) and :func:`diagnosis_table` (text).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .. import distributed
from .._io import atomic_write, atomic_write_json
from ..errors import check_positive, check_samples

__all__ = ["hidden_norms", "latent_norms", "diagnose", "write_diagnosis", "diagnosis_table", "FORCED_SPAN_AT"]

FORCED_SPAN_AT = 0  # where a span is forced for a model that writes none: right after the prompt


class _Means:
    """Running mean L2 norms per (row of the table, kind of position): float64 sums kept on the device and read
    back once, in :meth:`read` (a sum or a boolean index per layer and batch would wait for the device each time)."""

    def __init__(self, rows: int, kinds: tuple[str, ...]):
        self.rows, self.kinds = rows, kinds
        self.sums = self.counts = None

    def add(self, layers: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        """``layers``: ``rows`` hidden states (B, S, D); ``masks``: one (B, S) bool per kind, on one device."""
        where = masks[0].device
        norms = torch.stack([torch.linalg.vector_norm(h, dim=-1, dtype=torch.float64).to(where) for h in layers])
        sums = torch.stack([torch.where(mask, norms, 0.0).sum(dim=(1, 2)) for mask in masks], dim=1)
        counts = torch.stack([mask.sum() for mask in masks])
        self.sums = sums if self.sums is None else self.sums + sums
        self.counts = counts if self.counts is None else self.counts + counts

    def read(self) -> tuple[dict, dict]:
        """``({(row, kind): mean or None}, {kind: positions})``: the mean is None where there is no position."""
        kinds = len(self.kinds)
        values = torch.cat([self.sums.flatten(), self.counts.to(self.sums)]).tolist()
        counts = {kind: int(n) for kind, n in zip(self.kinds, values[self.rows * kinds:])}
        means = {(row, kind): values[row * kinds + j] / counts[kind] if counts[kind] else None
                 for row in range(self.rows) for j, kind in enumerate(self.kinds)}
        return means, counts


def _chunks(samples, batch):
    return [samples[i:i + batch] for i in range(0, len(samples), batch)]


def hidden_norms(model, tokenizer, samples: list[dict], *, batch: int = 8, settings: dict | None = None,
                 progress: bool | None = None) -> dict:
    """``{"input": {"text", "visual", "text_positions", "visual_positions"}, "layers": [{"layer", "text",
    "visual"}, ...] (1 to L, before the final norm), "final_norm": {"text", "visual"}}``: mean L2 norms over
    every prompt position of that kind (padding excluded); ``visual`` None when no prompt has an image."""
    from tqdm import tqdm

    from ..data.prompts import prompt_batch, to_model

    from ..models.qwen2_5_vl import hf_compat as hf

    lm = hf.language_model(model)
    means, captured = _Means(lm.config.num_hidden_layers + 2, ("text", "visual")), {}
    hook = hf.final_norm(model).register_forward_pre_hook(lambda module, args: captured.__setitem__("last", args[0]))
    try:
        for chunk in tqdm(_chunks(samples, batch), desc="hidden norms", unit="batch",
                          disable=distributed.bar_disable(progress)):
            inputs = to_model(prompt_batch(model, tokenizer, chunk, settings=settings), model)
            with torch.no_grad():
                states = model.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
            if len(states) != lm.config.num_hidden_layers + 1 or "last" not in captured:
                raise RuntimeError(f"hidden_states: expected the input embeddings and {lm.config.num_hidden_layers} "
                                   f"layers, got {len(states)} entries (transformers changed what it returns)")
            # hidden_states: the input embeddings, layers 1 .. L-1, then the last layer after the final norm
            layers = [*states[:-1], captured.pop("last"), states[-1]]
            visual = inputs["input_ids"] == model.config.image_token_id
            text = inputs["attention_mask"].bool() & ~visual
            means.add(layers, [text, visual])
    finally:
        hook.remove()
    count = len(states) - 1  # L
    mean, positions = means.read()
    return {"input": {"text": mean[(0, "text")], "visual": mean[(0, "visual")],
                      "text_positions": positions["text"], "visual_positions": positions["visual"]},
            "layers": [{"layer": i, "text": mean[(i, "text")], "visual": mean[(i, "visual")]}
                       for i in range(1, count + 1)],
            "final_norm": {"text": mean[(count + 1, "text")], "visual": mean[(count + 1, "visual")]}}


def latent_norms(model, tokenizer, samples: list[dict], *, batch: int = 8, max_new_tokens: int = 128,
                 span_at: int | None = None, suppress: list[int] | None = None, settings: dict | None = None,
                 tau_ema: torch.Tensor | None = None, desc: str = "latents", progress: bool | None = None) -> dict:
    """One generate over ``samples`` as the patched model is configured, traced: ``{"count", "before",
    "after", "visual"}``, the number of latents written and the mean L2 norms of the latents before calibration,
    as fed back, and of the prompts' visual input embeddings (None where there is nothing to average)."""
    from tqdm import tqdm

    from ..models import StepTrace
    from .responses import generate_responses

    raw, fed, visual = [], [], []
    for chunk in tqdm(_chunks(samples, batch), desc=desc, unit="batch", disable=distributed.bar_disable(progress)):
        trace = StepTrace()
        generate_responses(model, tokenizer, chunk, temperature=0.0, max_new_tokens=max_new_tokens, seed=0,
                           settings=settings, suppress=suppress, span_at=span_at, tau_ema=tau_ema, trace=trace)
        for values, rows in ((raw, trace.raw_norms), (fed, trace.fed_norms), (visual, trace.visual_norms)):
            values += [v for row in rows for v in row]

    def mean(values):
        return sum(values) / len(values) if values else None

    return {"count": len(raw), "before": mean(raw), "after": mean(fed), "visual": mean(visual)}


def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def _writes_latents(model, tokenizer, samples, *, batch, max_new_tokens, suppress, settings) -> bool:
    """Whether the model opens a span by itself on the first batch (decoded greedily)."""
    probe = latent_norms(model, tokenizer, samples[:batch], batch=batch, max_new_tokens=max_new_tokens,
                         suppress=suppress, settings=settings, desc="latents?", progress=False)
    return probe["count"] > 0


def _check_arguments(samples, calibrations, batch, max_new_tokens, span_at, known) -> None:
    """diagnose's arguments, each refused by name before any work (issue 17 items 6 and 11)."""
    check_samples(samples)
    if (isinstance(calibrations, str) or not calibrations
            or not all(isinstance(c, str) and c in known for c in calibrations)):
        raise ValueError(f"calibrations: expected a non-empty list of {', '.join(known)}, got {calibrations!r}")
    check_positive("batch", batch)
    check_positive("max_new_tokens", max_new_tokens)
    if span_at not in (None, "auto") and (isinstance(span_at, bool) or not isinstance(span_at, int)
                                          or not 0 <= span_at < max_new_tokens):
        raise ValueError(f"span_at: expected None, 'auto' or a new position in [0, {max_new_tokens}), "
                         f"got {span_at!r}")


def diagnose(model, tokenizer, samples: list[dict], *, calibrations=("none", "rms", "ema"), batch: int = 8,
             max_new_tokens: int = 128, span_at: int | str | None = "auto", suppress: list[int] | None = None,
             settings: dict | None = None, progress: bool | None = None) -> dict:
    """SPEC 4.7 for the patched ``model`` on ``samples``: :func:`hidden_norms` with ratios to the input norms,
    and :func:`latent_norms` per calibration mode with ratios to the visual input norm.

    ``span_at``: a new position where every response is made to open a span, None for never, ``"auto"``
    (default): :data:`FORCED_SPAN_AT` when the model opens none on the first batch by itself (or never
    samples the start token: it is in ``suppress``). Calibrated modes start every batch from one running
    target (:func:`gapkern.stages.responses.ema_start`), as ``gapkern eval`` does. The model's GapConfig and running
    target are restored at the end. Raises ValueError when no sample has an image.
    """
    from ..config import CALIBRATIONS
    from .responses import ema_start

    _check_arguments(samples, calibrations, batch, max_new_tokens, span_at, CALIBRATIONS)
    norms = hidden_norms(model, tokenizer, samples, batch=batch, settings=settings, progress=progress)
    visual_in, text_in = norms["input"]["visual"], norms["input"]["text"]
    if visual_in is None:
        raise ValueError("samples: no line has an image; the gap is measured against visual input embeddings")
    for entry in [*norms["layers"], norms["final_norm"]]:
        entry["text_ratio"], entry["visual_ratio"] = _ratio(entry["text"], text_in), _ratio(entry["visual"], visual_in)
    gap = model.gap
    config, saved, modes = gap.config, gap.tau_ema.detach().clone(), {}
    # one start target for every calibrated mode, taken before any generate here moves the model's own
    tau = ema_start(model, samples, batch=batch, settings=settings) if set(calibrations) - {"none"} else None
    try:
        if span_at == "auto":
            writes = gap.config.latent_start_id not in (suppress or []) and _writes_latents(
                model, tokenizer, samples, batch=batch, max_new_tokens=max_new_tokens, suppress=suppress,
                settings=settings)
            span_at = None if writes else FORCED_SPAN_AT
        for mode in calibrations:
            gap.config = dataclasses.replace(config, calibration=mode)
            found = latent_norms(model, tokenizer, samples, batch=batch, max_new_tokens=max_new_tokens,
                                 span_at=span_at, suppress=suppress, settings=settings,
                                 tau_ema=None if mode == "none" else tau, desc=f"latents {mode}", progress=progress)
            found["before_ratio"], found["after_ratio"] = (_ratio(found["before"], visual_in),
                                                           _ratio(found["after"], visual_in))
            modes[mode] = found
    finally:
        gap.config = config
        gap.tau_ema.copy_(saved)
    return {"lines": len(samples), **norms, "latents": {"span_at": span_at, "modes": modes}}


def _times(ratio: float) -> str:
    return f"{ratio:.3g}x" if ratio < 0.1 else f"{ratio:.2f}x" if ratio < 100 else f"{ratio:.0f}x"


def diagnosis_table(diagnosis: dict) -> str:
    """The diagnosis as a short plain-text table: norms and ratios per layer, then the latents per mode."""
    def num(value, ratio=False):
        return "-" if value is None else _times(value) if ratio else f"{value:.4g}"

    inp = diagnosis["input"]
    rows = [("", "text", "ratio", "visual", "ratio"),
            ("input embeddings", num(inp["text"]), _times(1.0), num(inp["visual"]), _times(1.0))]
    last = len(diagnosis["layers"])
    for entry, label in [*((e, f"layer {e['layer']}") for e in diagnosis["layers"]),
                         (diagnosis["final_norm"], f"layer {last}, normed")]:
        rows.append((label, num(entry["text"]), num(entry["text_ratio"], True), num(entry["visual"]),
                     num(entry["visual_ratio"], True)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    latents = diagnosis["latents"]
    forced = "never forced" if latents["span_at"] is None else f"span forced at new position {latents['span_at']}"
    lines.append(f"latents, ratio to the visual input norm {num(inp['visual'])} ({forced}):")
    for mode, found in latents["modes"].items():
        lines.append(f"  {mode:<5} {found['count']:>5} written   before calibration {num(found['before'])} "
                     f"({num(found['before_ratio'], True)})   as fed back {num(found['after'])} "
                     f"({num(found['after_ratio'], True)})")
    return "\n".join(lines) + "\n"


def write_diagnosis(diagnosis: dict, folder: str, *, title: str | None = None) -> tuple[str, str]:
    """``folder/diagnosis.json`` (the diagnosis) and ``folder/diagnosis.png`` (ratios per layer), atomically."""
    json_path, png_path = os.path.join(folder, "diagnosis.json"), os.path.join(folder, "diagnosis.png")
    atomic_write_json(json_path, diagnosis)
    atomic_write(png_path, lambda tmp: _plot(diagnosis, tmp, title))
    return json_path, png_path


def _plot(diagnosis: dict, path: str, title: str | None) -> None:
    # Figure + the Agg canvas directly: no pyplot global state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    layers = diagnosis["layers"]
    last = len(layers)
    for kind, color in (("text", "tab:blue"), ("visual", "tab:orange")):
        xs = [0] + [e["layer"] for e in layers if e[f"{kind}_ratio"]]
        ys = [1.0] + [e[f"{kind}_ratio"] for e in layers if e[f"{kind}_ratio"]]
        ax.plot(xs, ys, marker="o", ms=3, lw=1.5, color=color, label=f"{kind} hidden / {kind} input")
        normed = diagnosis["final_norm"][f"{kind}_ratio"]
        if normed:
            ax.plot([last], [normed], marker="D", mfc="none", color=color, ls="none",
                    label=f"{kind}, after the final norm")
    styles = iter(("-", "--", "-.", ":"))
    colors = {"none": "tab:red", "rms": "tab:green", "ema": "tab:purple"}
    modes = diagnosis["latents"]["modes"]
    first = modes.get("none") or next(iter(modes.values()), None)
    if first and first["before_ratio"]:
        ax.axhline(first["before_ratio"], color="tab:red", ls=next(styles), lw=1.2,
                   label=f"latents before calibration ({_times(first['before_ratio'])})")
    for mode, found in modes.items():
        if mode != "none" and found["after_ratio"]:
            ax.axhline(found["after_ratio"], color=colors.get(mode, "gray"), ls=next(styles, ":"), lw=1.2,
                       label=f"latents after {mode} ({_times(found['after_ratio'])})")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer (0: input embeddings)", ylabel="mean L2 norm / input embedding norm",
           title=title or "Norm gap: hidden states and latents vs input embeddings")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
