"""The demo's summary files: the pictures (losses, accuracy with error bars) and report.md with the paper's tables.

Errors are binomial standard errors, ``sqrt(p (1 - p) / n)`` over a task's
eval lines (Avg-P / Avg-R: the mean of the tasks' errors in quadrature). Two
configurations differ beyond their errors when the difference is more than
twice the standard error of the difference.
"""
from __future__ import annotations

import math
import os

from .._io import atomic_write, atomic_write_text, read_json
from .difficulty import RULE, check
from .measure import CHANCE

__all__ = ["loss_history", "plot_losses", "plot_accuracy", "se", "score_lines", "configuration_table",
           "write_report"]

TRAININGS = (("base", "base (plain text)"), ("text", "text-only"), ("oai", "output-as-input"),
             ("pca-all", "PCA, all latent"), ("gap", "GAP"), ("full", "full-dim head"))
LATENT = ("oai", "pca-all", "gap", "full")


def loss_history(folder: str) -> list[dict]:
    """The logged training entries (``loss``, ``text_loss``, ``latent_loss``, ``step``) of a ``train`` output."""
    state = read_json(os.path.join(folder, "trainer_state.json"))
    return [entry for entry in state["log_history"] if "loss" in entry]


def _figure(width: float, height: float, columns: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns)


def _save(fig, path: str) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_losses(run, path: str) -> None:
    """Text loss of every training (the arms continue the base run's steps) and the latent loss of the latent arms."""
    history = {name: loss_history(run.folder(name)) for name, _ in TRAININGS}
    offset = run.plan.base_steps
    fig, (text, latent) = _figure(9, 3.4, 2)
    for name, label in TRAININGS:
        shift = 0 if name == "base" else offset
        text.plot([e["step"] + shift for e in history[name]], [e["text_loss"] for e in history[name]],
                  label=label, lw=1.2)
        if name in LATENT:
            latent.plot([e["step"] + offset for e in history[name]], [e["latent_loss"] for e in history[name]],
                        label=label, lw=1.2)
    text.axvline(offset, color="gray", ls=":", lw=1)  # the arms start from the base model
    text.set(xlabel="optimizer step", ylabel="text loss (cross-entropy)", yscale="log", title="text loss")
    latent.set_yscale("log", nonpositive="mask")  # a log with no latent slot in its batches logs 0: left out
    latent.set(xlabel="optimizer step", ylabel="latent loss (MSE)",
               title="latent loss (output-as-input over D, heads over d)")
    latent.title.set_fontsize(10)
    for ax in (text, latent):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def se(result: dict, key: str) -> float | None:
    """The binomial standard error of a configuration's Avg-P (``avg_p``) or Avg-R (``avg_r``)."""
    category = {"avg_p": "perception", "avg_r": "reasoning"}[key]
    tasks = [t for t, c in result["categories"].items() if c == category]
    if not tasks:
        return None
    parts = [result["tasks"][t] * (1 - result["tasks"][t]) / result["counts"][t] for t in tasks]
    return math.sqrt(sum(parts)) / len(tasks)


def plot_accuracy(scores: dict, path: str) -> None:
    """Avg-P and Avg-R of every configuration with binomial standard-error bars, chance marked."""
    names = list(scores)
    fig, axes = _figure(9, 3.6, 2)
    for ax, key, title in zip(axes, ("avg_p", "avg_r"), ("Avg-P (perception)", "Avg-R (reasoning)")):
        values = [100 * scores[n][key] for n in names]
        errors = [100 * se(scores[n], key) for n in names]
        ax.barh(range(len(names)), values, xerr=errors, color="tab:blue", alpha=0.75, capsize=3)
        ax.axvline(100 * CHANCE, color="gray", ls=":", lw=1)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 100), xlabel="accuracy (%), bars: 1 standard error", title=title)
        ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


def _cell(result: dict, key: str) -> str:
    value = result[key]
    return "-" if value is None else f"{100 * value:.1f} ± {100 * se(result, key):.1f}"


def _ratio(result: dict, which: str) -> str:
    norms = result.get("norms")
    return "-" if not norms else f"{norms[which]:.3g}x"


def score_lines(scores: dict, names=None) -> list[str]:
    """The arms' table: per task, Avg-P and Avg-R (± SE), span rate, latents per line."""
    names = list(scores) if names is None else names
    tasks = list(scores[names[0]]["tasks"])
    lines = ["| configuration | " + " | ".join(tasks) + " | Avg-P | Avg-R | span rate | latents / line |",
             "| --- |" + " ---: |" * (len(tasks) + 4)]
    for name in names:
        result = scores[name]
        cells = [f"{100 * result['tasks'][t]:.1f}" for t in tasks] + [_cell(result, k) for k in ("avg_p", "avg_r")]
        cells += [f"{100 * result['span_rate']:.1f}%", f"{result['latents_per_line']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _calibration_lines(scores: dict) -> list[str]:
    lines = ["| configuration | Avg-P | Avg-R | span rate | latent / visual norm, uncalibrated | as fed back |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in scores.items():
        if result["calibration"] == "none" and not name.endswith(", none"):
            continue  # base and text-only: no span
        lines.append(f"| {name} | {_cell(result, 'avg_p')} | {_cell(result, 'avg_r')} | "
                     f"{100 * result['span_rate']:.1f}% | {_ratio(result, 'before_ratio')} | "
                     f"{_ratio(result, 'after_ratio')} |")
    return lines


def _spans(scores: dict) -> list[str]:
    """Which arms trained with latents opened a span at greedy decoding, and which decoded as plain text."""
    latent = {name: result for name, result in scores.items() if result["model"] not in ("base", "text")}
    opened = [f"{name} {100 * r['span_rate']:.1f}%" for name, r in latent.items() if r["span_lines"]]
    closed = [name for name, r in latent.items() if not r["span_lines"]]
    lines = ["Spans at inference: " + ("; ".join(opened) if opened else "no arm opened a span") + "."]
    if closed:
        lines.append(f"No span opened for {', '.join(closed)}: these decode as plain text, so their calibration "
                     "cannot change an answer and their none and ema rows are the same model's same output.")
    return [" ".join(lines)]


def _beyond(a: dict, b: dict, key: str) -> tuple[float, bool]:
    """The difference a - b in points and whether it is beyond twice its standard error."""
    diff = a[key] - b[key]
    return 100 * diff, abs(diff) > 2 * math.hypot(se(a, key), se(b, key))


def comparisons(scores: dict) -> list[str]:
    """One line per comparison the paper makes: the difference and whether it is inside the error bars."""
    pairs = [("GAP, none", "text-only"), ("GAP, none", "PCA, all latent, none"),
             ("GAP, none", "output-as-input, none"), ("PCA, all latent, none", "output-as-input, none"),
             ("output-as-input, ema", "output-as-input, none"), ("GAP, ema", "GAP, none"),
             ("full-dim head, none", "GAP, none")]
    lines = []
    for a, b in pairs:
        parts = []
        for key, label in (("avg_p", "Avg-P"), ("avg_r", "Avg-R")):
            diff, beyond = _beyond(scores[a], scores[b], key)
            parts.append(f"{label} {diff:+.1f} points ({'beyond' if beyond else 'inside'} the error bars)")
        lines.append(f"- {a} vs {b}: " + ", ".join(parts))
    return lines


def configuration_table(scores: dict) -> dict:
    """``demo.json``'s ``configurations``: per configuration (arm x calibration) what the report's tables hold,
    so a script can read them: accuracies per task, Avg-P / Avg-R with their standard errors, span rate, latents
    per line and, where a span opened, the latent / visual input norm ratio before and after calibration."""
    out = {}
    for name, result in scores.items():
        norms = result.get("norms")
        out[name] = {"arm": result["arm"], "calibration": result["calibration"], "model": result["model"],
                     "tasks": result["tasks"], "counts": result["counts"],
                     **{key: result[key] for key in ("avg_p", "avg_r")},
                     **{f"{key}_se": None if result[key] is None else se(result, key) for key in ("avg_p", "avg_r")},
                     "lines": result["lines"], "span_rate": result["span_rate"], "span_lines": result["span_lines"],
                     "latents_per_line": result["latents_per_line"],
                     "norm_ratio": None if not norms else {"before": norms["before_ratio"],
                                                           "after": norms["after_ratio"]}}
    return out


def write_report(run) -> str:
    """report.md, losses.png and accuracy.png, and ``configurations`` in ``demo.json``; returns the arms' table
    as text for the console."""
    stages = run.folder.record["stages"]
    scores = stages["eval"]["scores"]
    run.folder.put("configurations", configuration_table(scores))
    plot_losses(run, run.folder("losses.png"))
    plot_accuracy(scores, run.folder("accuracy.png"))
    table = "\n".join(score_lines(scores))
    atomic_write_text(run.folder("report.md"), _report(run, stages, scores, table))
    return table


def _diagnosis(found: dict) -> list[str]:
    lines = ["| model | last layer, text | last layer, visual | latents, uncalibrated | after rms | after ema |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for folder, title in (("oai", "output-as-input"), ("gap", "GAP (PCA head)")):
        s = found[folder]
        forced = "" if s["span_at"] is None else " (span forced)"
        lines.append(f"| {title}{forced} | {s['last_text_ratio']:.3g}x | {s['last_visual_ratio']:.3g}x | "
                     f"{s['before_ratio']:.3g}x | {s['rms_ratio']:.3g}x | {s['ema_ratio']:.3g}x |")
    return lines


def _report(run, stages: dict, scores: dict, table: str) -> str:
    plan, cur, pca = run.plan, stages["curate"], stages["fit-pca"]
    perception = next(t for t, c in next(iter(scores.values()))["categories"].items() if c == "perception")
    rule = check(scores, perception)
    hard = ", ".join(f"{t} {v['hard']} of {v['lines']}" for t, v in cur["by_task"].items())
    timing = " | ".join(f"{name} {stages[name]['seconds']:.0f} s" for name in stages)
    total = sum(stage["seconds"] for stage in stages.values())
    n = next(iter(scores.values()))["lines"]
    ablation = [name for name in scores if name.startswith(("GAP", "full-dim"))]
    parts = [
        "# gapkern demo", "",
        f"The paper's tables in miniature: a synthetic task, a tiny Qwen2.5-VL (size `{plan.size}`, seed "
        f"{run.seed}), every arm trained {plan.steps} steps from the same base model, evaluated greedily on "
        f"{n} eval lines; {total / 60:.1f} minutes (the stages' times added up) on this machine. Accuracies in %, "
        "± one binomial standard error; chance is 25%.", "",
        f"Difficulty rule (fixed before any latent arm was run): {RULE}. This run: "
        + "; ".join(f"{k}: {'holds' if v else 'MISSED'}" for k, v in rule.items()) + ".", "",
        "## Arms (Avg-P / Avg-R)", "",
        "Each arm with calibration none (ema in the next table). Span rate: the share of eval lines where the "
        "model opened a latent span by itself; latents / line: latent vectors written per line. Base and "
        "text-only are never allowed to open a span (they were not trained to write one).", "",
        table, "",
        *_spans(scores), "",
        "## Calibration (the training-free experiment)", "",
        "The same checkpoints decoded with calibration none and ema. Norms: mean L2 norm of the latents at the "
        "spans that opened, over the mean norm of the prompts' visual input embeddings (uncalibrated: before "
        "calibration; as fed back: after it).", "",
        *_calibration_lines(scores), "",
        "## Dimensionality ablation", "",
        f"GAP's head keeps d={pca['d']} of D={pca['dim']} directions ({100 * pca['explained']:.1f}% of the "
        f"visual variance); the full-dim head keeps all {pca['dim']}, on the same hard lines.", "",
        *score_lines(scores, ablation), "",
        "## Which differences are beyond the error bars", "",
        "Beyond: the difference is more than twice its standard error.", "",
        *comparisons(scores), "",
        "![accuracy per configuration](accuracy.png)", "",
        "## Norm gap (diagnose)", "",
        f"Mean L2 norms on the first {plan.diagnose_lines} eval lines, as ratios to the matching input "
        "embeddings' norm (last layer: before the final norm; latents: to the visual input norm). "
        "`diagnose/*/table.txt` has every layer.", "",
        *_diagnosis(stages["diagnose"]), "",
        "![diagnosis, output-as-input](diagnose/oai/diagnosis.png)", "![diagnosis, GAP](diagnose/gap/diagnosis.png)",
        "",
        "## What ran", "",
        f"- **base**: {plan.base_steps} steps of plain-text fine-tuning from a random init, stopped early.",
        f"- **curate**: {plan.attempts} attempts per training line at temperature 1; hard (none right): "
        f"{cur['hard']} of {cur['lines']} ({hard}).",
        "- **text-only**: every line as plain text. **output-as-input**: no head, the latent loss on the hidden "
        "state, latent spans on every line. **PCA, all latent**: the PCA head, latent spans on every line. "
        "**GAP**: the PCA head, latent spans on the hard lines only. **full-dim head**: GAP with d = D.",
        "", "![training losses](losses.png)", "", f"Stage times: {timing}.", ""]
    return "\n".join(parts)
