"""The demo's summary files: the loss curves (PNG) and report.md with the score table against chance."""
from __future__ import annotations

import math
import os

from .._io import atomic_write, atomic_write_text, read_json
from .measure import CHANCE

__all__ = ["loss_history", "plot_losses", "score_lines", "write_report"]

RUNS = (("base", "base (plain text)"), ("text", "text-only fine-tune"), ("gap", "GAP"))


def loss_history(folder: str) -> list[dict]:
    """The logged training entries (``loss``, ``text_loss``, ``latent_loss``, ``step``) of a ``train`` output."""
    state = read_json(os.path.join(folder, "trainer_state.json"))
    return [entry for entry in state["log_history"] if "loss" in entry]


def plot_losses(run, path: str) -> None:
    """Text loss of the three trainings (the fine-tunes continue the base run's steps) and GAP's latent loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    history = {name: loss_history(run.folder(name)) for name, _ in RUNS}
    offset = run.plan.base_steps
    fig = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    text, latent = fig.subplots(1, 2)
    for name, label in RUNS:
        shift = 0 if name == "base" else offset
        steps = [e["step"] + shift for e in history[name]]
        text.plot(steps, [e["text_loss"] for e in history[name]], label=label, lw=1.5)
    for step in (offset, offset + max(run.plan.steps // 2, 1)):  # the fine-tunes start; their halfway eval
        text.axvline(step, color="gray", ls=":", lw=1)
    text.set(xlabel="optimizer step", ylabel="text loss (cross-entropy)", yscale="log", title="text loss")
    text.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.01, 0.02, 0.05, 0.1, ...
    text.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    text.yaxis.set_minor_formatter(NullFormatter())
    text.legend(fontsize=8)
    gap = history["gap"]
    latent.plot([e["step"] + offset for e in gap], [e["latent_loss"] for e in gap], color="tab:green", lw=1.5)
    latent.set_yscale("log", nonpositive="mask")  # a log with no latent slot in its batches logs 0: left out
    latent.set(xlabel="optimizer step", ylabel="latent loss (coefficient MSE)", title="GAP latent loss")
    for ax in (text, latent):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _above(acc: float, n: int) -> str:
    """Points above (or below) chance and how many standard errors of a chance-level guesser that is."""
    se, diff = math.sqrt(CHANCE * (1 - CHANCE) / n), acc - CHANCE
    return f"{100 * abs(diff):.1f} points {'above' if diff >= 0 else 'below'} chance ({abs(diff) / se:.1f} SE)"


def score_lines(scores: dict) -> list[str]:
    """The score table (percent), then one line per configuration: its mean accuracy against chance."""
    tasks = list(next(iter(scores.values()))["tasks"])
    lines = ["| configuration | " + " | ".join(tasks) + " | Avg-P | Avg-R |",
             "| --- |" + " ---: |" * (len(tasks) + 2)]
    for name, result in scores.items():
        cells = [f"{100 * result['tasks'][t]:.1f}" for t in tasks]
        cells += ["-" if result[k] is None else f"{100 * result[k]:.1f}" for k in ("avg_p", "avg_r")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, result in scores.items():
        n = sum(result["counts"].values())
        acc = sum(result["tasks"][t] * result["counts"][t] for t in tasks) / n
        lines.append(f"- {name}: {100 * acc:.1f}% of {n} lines, {_above(acc, n)}")
    return lines


def write_report(run) -> str:
    """report.md (and losses.png); returns the score table's lines as text for the console."""
    plot_losses(run, run.folder("losses.png"))
    stages = run.folder.record["stages"]
    scores = stages["eval"]["scores"]
    table = "\n".join(score_lines(scores))
    text = _report(run, stages, table)
    atomic_write_text(run.folder("report.md"), text)
    return table


def _no_spans(spans: dict, curated: dict) -> list[str]:
    """Why calibration changed nothing, when the GAP model wrote no latent at eval."""
    if any(value for name, value in spans.items() if name.startswith("GAP")):
        return []
    return ["", f"The GAP model opened no latent span at greedy decoding (it trained with spans on the "
            f"{curated['hard']} hard lines of {curated['lines']} only: wherever a span could open, the plain-text "
            "continuation won). Calibration none and ema therefore give the same answers here; diagnose (below) "
            "forces a span to measure the latents."]


def _diagnosis(found: dict) -> list[str]:
    lines = ["Mean L2 norms on the first eval lines, as ratios to the matching input embeddings' norm "
             "(`diagnose/*/table.txt` has every layer):", "",
             "| model | last layer, text | last layer, visual | latents, uncalibrated | after rms | after ema |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for folder, title in (("gap", "GAP (PCA head)"), ("base", "base, output-as-input")):
        s = found[folder]
        forced = "" if s["span_at"] is None else " (span forced)"
        lines.append(f"| {title}{forced} | {s['last_text_ratio']:.3g}x | {s['last_visual_ratio']:.3g}x | "
                     f"{s['before_ratio']:.3g}x | {s['rms_ratio']:.3g}x | {s['ema_ratio']:.3g}x |")
    lines += ["", "Last layer: its hidden states before the final norm. Latent ratios are to the visual input norm. "
              "A span is forced right after the prompt for a model that opens none by itself.", "",
              "![diagnosis, GAP](diagnose/gap/diagnosis.png)",
              "![diagnosis, output-as-input](diagnose/base/diagnosis.png)"]
    return lines


def _report(run, stages: dict, table: str) -> str:
    plan, cur, pca = run.plan, stages["curate"], stages["fit-pca"]
    hard = ", ".join(f"{t} {v['hard']} of {v['lines']}" for t, v in cur["by_task"].items())
    spans = stages["eval"]["spans_per_line"]
    timing = " | ".join(f"{name} {stages[name]['seconds']:.0f} s" for name in stages)
    total = sum(stage["seconds"] for stage in stages.values())
    parts = [
        "# gapkern demo",
        "",
        f"The GAP path end to end on a synthetic task and a tiny Qwen2.5-VL (size `{plan.size}`, seed {run.seed}), "
        f"in {total / 60:.1f} minutes (the stages' times added up) on this machine.",
        "",
        "## Scores on the eval split (accuracy, %)",
        "",
        table,
        "",
        f"Chance is {100 * CHANCE:.0f}% on every line (four choices). SE: the standard error of a guesser's "
        "accuracy over the same lines. Eval is greedy; the base and text-only models are not allowed to open a "
        "latent span (they were never trained to write one). Latent spans written per eval line: "
        + ", ".join(f"{name} {value:.2f}" for name, value in spans.items()) + ".",
        *_no_spans(spans, cur),
        "",
        "## Norm gap (diagnose)",
        "",
        *_diagnosis(stages["diagnose"]),
        "",
        "## What ran",
        "",
        f"1. **task**: {stages['task']['train']} training and {stages['task']['eval']} eval lines, two tasks: "
        "`colour` (perception: the colour of the large or the small square) and `count` (reasoning: how many of "
        "three squares are large); a latent step per square that answers, its box the square's cell. Files: "
        "`task/`.",
        f"2. **init**: a random tiny Qwen2.5-VL ({stages['init']['parameters'] / 1e3:.0f}k parameters, "
        f"D={stages['init']['hidden_size']}) and its word-level tokenizer. `init/`.",
        f"3. **base**: {plan.base_steps} steps of plain-text fine-tuning (no latent spans), stopped early, so the "
        "base model is partly competent. `base/`.",
        f"4. **fit-pca**: the PCA latent head on the base model's visual input embeddings (the training images and "
        f"the latent steps' crops): d={pca['d']} of D={pca['dim']} keeps {100 * pca['explained']:.1f}% of the "
        f"variance; {'whitened' if pca['whitened'] else 'not whitened'}. `pca/` (pca.png: the curve).",
        f"5. **curate**: {plan.attempts} sampled attempts per training line (temperature 1); a line is hard when "
        f"none is right: {cur['hard']} of {cur['lines']} ({hard}). `curate/curated.jsonl`.",
        f"6. **build-data**: the latent targets of the hard lines: {stages['build-data']['latent_steps']} steps "
        f"of K={stages['build-data']['K']} pooled visual embeddings each. `data/`.",
        f"7. **train-gap**: {plan.steps} steps from the base model; hard lines with their latent spans (text loss "
        "+ latent loss through the head), the others as plain text. `gap/`.",
        f"8. **train-text**: the control, {plan.steps} steps from the base model on the same lines, all as plain "
        "text. `text/`.",
        f"9. **eval**: the table above, greedy, each fine-tune at its halfway checkpoint (step "
        f"{max(plan.steps // 2, 1)}) and at the end; `eval/NAME/predictions.jsonl` per configuration, "
        "`eval/scores.json`.",
        "10. **diagnose**: the norm gap of the final GAP model and of the base model used output-as-input. "
        "`diagnose/`.",
        "",
        "![training losses](losses.png)",
        "",
        f"Stage times: {timing}.",
        "",
    ]
    return "\n".join(parts)
