"""The demo's measurements: eval of base, text-only and GAP (calibration none and ema), and the norm-gap diagnosis."""
from __future__ import annotations

import os

from .._io import atomic_write_text

__all__ = ["configurations", "CHANCE", "evaluate_all", "diagnose_all"]

CHANCE = 0.25  # four choices on every line


def configurations(plan) -> dict:
    """Name in the score table -> (checkpoint folder in the demo folder, calibration or None: the checkpoint's own).

    Each fine-tune is scored halfway (its checkpoint) and at the end, GAP with calibration none and ema.
    """
    half = max(plan.steps // 2, 1)
    out = {"base": ("base", None)}
    for step, where in ((half, f"checkpoint-{half}"), (plan.steps, "")):
        out[f"text-only, step {step}"] = (os.path.join("text", where), None)
        for mode in ("none", "ema"):
            out[f"GAP {mode}, step {step}"] = (os.path.join("gap", where), mode)
    return out


def _slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def evaluate_all(run) -> tuple[dict, str]:
    """Every configuration on the eval split, greedy, into ``eval/`` as ``gapkern eval`` lays it out:
    NAME/predictions.jsonl per configuration, scores.json, scores.md."""
    from itertools import groupby

    from ..data import load_samples
    from ..stages.evaluate import evaluate, score, write_scores
    from .stages import load, settings

    samples = load_samples(run.eval_file())
    scores, latents = {}, {}
    runs = [(name, os.path.normpath(folder), calibration)
            for name, (folder, calibration) in configurations(run.plan).items()]
    for folder, group in groupby(runs, key=lambda one: one[1]):  # a folder's configurations follow each other
        model, tokenizer = load(run.folder(folder))  # once for its configurations, as gapkern eval does
        # base and text-only never trained on a latent span: they must not open one (gapkern eval does the same)
        suppress = [model.gap.config.latent_start_id] if model.gap.head is None else []
        for name, _, calibration in group:
            predictions = os.path.join(_slug(name), "predictions.jsonl")  # the layout of gapkern eval's --out
            lines = evaluate(model, tokenizer, samples, run.folder("eval", predictions), calibration=calibration,
                             batch=16, max_new_tokens=run.plan.max_new_tokens, settings=settings(run),
                             suppress=suppress, identity={"model": folder}, desc=name, progress=run.progress)
            scores[name] = {**score(lines), "model": folder, "calibration": calibration, "predictions": predictions,
                            "latent_lines": sum(line["latents"] > 0 for line in lines)}
            latents[name] = sum(line["latents"] for line in lines) / len(lines) / run.plan.grid ** 2
    write_scores(run.folder("eval"), scores)
    means = ", ".join(f"{name} {100 * _mean(result):.0f}%" for name, result in scores.items())
    return {"scores": scores, "spans_per_line": latents}, (
        f"{len(samples)} lines, mean accuracy over the tasks (chance {100 * CHANCE:.0f}%): {means}")


def _mean(result: dict) -> float:
    values = list(result["tasks"].values())
    return sum(values) / len(values)


# the models diagnosed: folder -> title of the picture
DIAGNOSED = {"gap": "GAP model (PCA head)", "base": "base model used output-as-input (no head)"}


def diagnose_all(run) -> tuple[dict, str]:
    """SPEC 4.7 on the first eval lines for the GAP model and for the base model as output-as-input."""
    from ..data import load_samples
    from ..stages.diagnose import diagnose, diagnosis_table, write_diagnosis
    from .stages import load, settings

    samples = load_samples(run.eval_file())[:run.plan.diagnose_lines]
    found = {}
    for folder, title in DIAGNOSED.items():
        model, tokenizer = load(run.folder(folder))
        suppress = [model.gap.config.latent_start_id] if model.gap.head is None else []
        result = diagnose(model, tokenizer, samples, calibrations=("none", "rms", "ema"), batch=16,
                          max_new_tokens=run.plan.max_new_tokens, suppress=suppress, settings=settings(run),
                          progress=run.progress)
        write_diagnosis(result, run.folder("diagnose", folder), title=f"Norm gap: {title}")
        atomic_write_text(run.folder("diagnose", folder, "table.txt"), diagnosis_table(result))
        found[folder] = result
    summary = {folder: _gap_summary(result) for folder, result in found.items()}
    line = "; ".join(f"{folder}: latents {s['before_ratio']:.3g}x the visual input norm before calibration, "
                     f"{s['ema_ratio']:.3g}x after ema" for folder, s in summary.items())
    return summary, line


def _gap_summary(result: dict) -> dict:
    modes = result["latents"]["modes"]
    return {"span_at": result["latents"]["span_at"], "visual_input": result["input"]["visual"],
            "text_input": result["input"]["text"], "before_ratio": modes["none"]["before_ratio"],
            "ema_ratio": modes["ema"]["after_ratio"], "rms_ratio": modes["rms"]["after_ratio"],
            "last_text_ratio": result["layers"][-1]["text_ratio"],
            "last_visual_ratio": result["layers"][-1]["visual_ratio"]}
