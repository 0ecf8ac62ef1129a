"""The demo's measurements: eval of base, text-only and GAP (calibration none and ema), and the norm-gap diagnosis."""
from __future__ import annotations

import os

from .._io import atomic_write_text

__all__ = ["configurations", "CHANCE", "evaluate_all", "diagnose_all"]

CHANCE = 0.25  # four choices on every line


def configurations() -> dict:
    """Name in the score table -> (arm, checkpoint folder in the demo folder, calibration).

    Every arm trained with latents is scored with calibration none and ema; base and text-only never open a
    span, so their calibration changes nothing.
    """
    from .arms import ARMS

    out = {"base": ("base", "base", "none")}
    for arm, (folder, _, head) in ARMS.items():
        for mode in ("none",) if arm == "text-only" else ("none", "ema"):
            out[arm if arm == "text-only" else f"{arm}, {mode}"] = (arm, folder, mode)
    return out


def _slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def evaluate_all(run) -> tuple[dict, str]:
    """Every configuration on the eval split, greedy, into ``eval/`` as ``gapkern eval`` lays it out:
    NAME/predictions.jsonl per configuration, scores.json, scores.md; per configuration also its span rate
    (the share of lines where a span opened), latents per line and the latents' norms at the spans that opened."""
    from itertools import groupby

    from ..data import load_samples
    from ..stages.evaluate import evaluate, write_scores
    from ..stages.scoring import score
    from .arms import load, settings

    samples = load_samples(run.eval_file())
    scores = {}
    runs = [(name, *one) for name, one in configurations().items()]
    for folder, group in groupby(runs, key=lambda one: one[2]):  # a folder's configurations follow each other
        model, tokenizer = load(run.folder(folder))  # once for its configurations, as gapkern eval does
        # base and text-only never trained on a latent span: they must not open one (gapkern eval does the same)
        trained = folder not in ("base", "text")
        suppress = [] if trained else [model.gap.config.latent_start_id]
        starts = {}
        for name, arm, _, calibration in group:
            predictions = os.path.join(_slug(name), "predictions.jsonl")  # the layout of gapkern eval's --out
            lines = evaluate(model, tokenizer, samples, run.folder("eval", predictions), calibration=calibration,
                             batch=16, max_new_tokens=run.plan.max_new_tokens, settings=settings(run),
                             suppress=suppress, identity={"model": folder}, desc=name, progress=run.progress,
                             starts=starts)
            opened = sum(line["latents"] > 0 for line in lines)
            scores[name] = {**score(lines), "arm": arm, "model": folder, "calibration": calibration,
                            "predictions": predictions, "lines": len(lines), "span_lines": opened,
                            "span_rate": opened / len(lines),
                            "latents_per_line": sum(line["latents"] for line in lines) / len(lines),
                            "norms": _norms(run, model, tokenizer, samples, calibration, starts) if opened else None}
    write_scores(run.folder("eval"), scores)
    means = ", ".join(f"{name} {100 * _mean(result):.0f}% (spans {100 * result['span_rate']:.0f}%)"
                      for name, result in scores.items())
    return {"scores": scores}, f"{len(samples)} lines, mean accuracy (chance {100 * CHANCE:.0f}%): {means}"


def _norms(run, model, tokenizer, samples, calibration: str, starts: dict) -> dict:
    """The latents' mean L2 norm before and after calibration at the spans that opened, over the visual input
    norm: the same greedy generate as the eval (same batches, same start target), traced."""
    import dataclasses

    from ..stages.diagnose import latent_norms
    from ..stages.responses import ema_start
    from .arms import settings

    gap = model.gap
    config, saved = gap.config, gap.tau_ema.detach().clone()
    try:
        gap.config = dataclasses.replace(config, calibration=calibration)
        tau = None if calibration == "none" else ema_start(model, samples, batch=16, settings=settings(run))
        found = latent_norms(model, tokenizer, samples, batch=16, max_new_tokens=run.plan.max_new_tokens,
                             settings=settings(run), tau_ema=tau, desc="norms", progress=run.progress)
    finally:
        gap.config = config
        gap.tau_ema.copy_(saved)
    visual = found["visual"]
    return {**found, "before_ratio": found["before"] / visual, "after_ratio": found["after"] / visual}


def _mean(result: dict) -> float:
    values = list(result["tasks"].values())
    return sum(values) / len(values)


# the models diagnosed: folder -> title of the picture
DIAGNOSED = {"gap": "GAP model (PCA head)", "oai": "output-as-input model (no head, trained with latents)"}


def diagnose_all(run) -> tuple[dict, str]:
    """SPEC 4.7 on the first eval lines for the GAP model and the output-as-input arm."""
    from ..data import load_samples
    from ..stages.diagnose import diagnose, diagnosis_table, write_diagnosis
    from .arms import load, settings

    samples = load_samples(run.eval_file())[:run.plan.diagnose_lines]
    found = {}
    for folder, title in DIAGNOSED.items():
        model, tokenizer = load(run.folder(folder))
        result = diagnose(model, tokenizer, samples, calibrations=("none", "rms", "ema"), batch=16,
                          max_new_tokens=run.plan.max_new_tokens, settings=settings(run),
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
