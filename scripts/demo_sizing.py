"""The demo's sizing runs of the difficulty rule, version 2 (``gapkern.demo.difficulty``): for one small-square
side, the demo's stages up to the text-only arm on the full plan, seed 0, then the eval of base and text-only
only, and whether the rule's parts 1 and 2 hold. Nothing else is run or looked at.

    python scripts/demo_sizing.py SIDE OUT     # e.g. 3 /tmp/sizing-3

OUT is a demo folder: the full run at the side taken resumes it (``gapkern demo --out OUT`` once the plan's
``small_square`` is that side). The two evals go to OUT-sizing/, the verdict to OUT-sizing/sizing.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from gapkern.data import load_samples
from gapkern.demo import run as demo_run
from gapkern.demo.folder import Folder
from gapkern.demo.plan import PLANS
from gapkern.demo.stages import Run, load, settings
from gapkern.stages.evaluate import evaluate
from gapkern.stages.scoring import score


def main(side: int, out: str) -> dict:
    plan = dataclasses.replace(PLANS["full"], small_square=side)
    demo_run.PLANS = {**PLANS, "full": plan}
    demo_run.run_demo(out, until="train-text", progress=False)
    run = Run(Folder(out, {"size": "full", "seed": 0, "plan": plan.to_dict()}), plan, 0, False)
    samples = load_samples(run.eval_file())
    sizing = out.rstrip("/") + "-sizing"
    result = {"small_square": side}
    for name, folder in (("base", "base"), ("text-only", "text")):
        model, tokenizer = load(run.folder(folder))
        lines = evaluate(model, tokenizer, samples, os.path.join(sizing, folder, "predictions.jsonl"),
                         calibration="none", batch=16, max_new_tokens=plan.max_new_tokens, settings=settings(run),
                         suppress=[model.gap.config.latent_start_id], identity={"model": folder}, desc=name,
                         progress=False, starts={})
        result[name] = score(lines)["tasks"]
    result["base 30-60% on perception"] = 0.30 <= result["base"]["colour"] <= 0.60
    result["text-only < 90% on perception"] = result["text-only"]["colour"] < 0.90
    with open(os.path.join(sizing, "sizing.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
