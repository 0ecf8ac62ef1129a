"""The demo's stages, each through the GAP path's library functions (the ones the ``gapkern`` commands run).

Every stage reads what earlier stages wrote into the demo folder and writes
its own subfolder; it returns a small JSON summary (kept in ``demo.json``)
and one line for the console.
"""
from __future__ import annotations

import os
import shutil
from functools import partial

from .arms import ARMS, Run, load, settings

__all__ = ["ARMS", "Run", "STAGES", "load", "settings"]


# ---- the task and the models ------------------------------------------------------------------------------

def make_task(run: Run) -> tuple[dict, str]:
    from ..data import load_samples
    from . import task

    folder = run.folder("task")
    small = run.plan.small_square
    train = load_samples(task.write_split(folder, "train", run.plan.train_per_task, run.seed, small))
    evals = load_samples(task.write_split(folder, "eval", run.plan.eval_per_task, run.seed, small))
    tasks = ", ".join(f"{name} ({category})" for name, category in task.TASKS.items())
    summary = {"train": len(train), "eval": len(evals), "tasks": task.TASKS}
    return summary, f"{len(train)} train + {len(evals)} eval lines, tasks {tasks}, 84x84 PNGs, 4 choices each"


def make_init(run: Run) -> tuple[dict, str]:
    from .model import demo_model

    model, tokenizer, _ = demo_model(run.plan.size, seed=run.seed)
    path = run.folder("init")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = model.config.text_config
    count = sum(p.numel() for p in model.parameters())
    summary = {"parameters": count, "hidden_size": text.hidden_size, "layers": text.num_hidden_layers,
               "vocab": text.vocab_size}
    return summary, (f"random Qwen2.5-VL: D={text.hidden_size}, {text.num_hidden_layers} layers, "
                     f"{count / 1e3:.0f}k parameters, {text.vocab_size}-word tokenizer")


def _train(run: Run, model, tokenizer, samples, name: str, steps: int, targets=None) -> dict:
    from ..train import train, training_arguments

    out = run.folder(name)
    args = training_arguments(out, max_steps=steps, learning_rate=run.plan.lr, seed=run.seed,
                              per_device_train_batch_size=run.plan.batch, logging_steps=run.plan.logging_steps,
                              save_strategy="no", use_cpu=True, disable_tqdm=run.progress is False)
    summary = train(model, tokenizer, samples, out, targets=targets, args=args, image_settings=settings(run),
                    log_lines=False)
    first, last = summary["first"] or {}, summary["last"] or {}  # the first and the last logged losses
    return {"steps": summary["steps"], "lines": summary["samples"], "latent_lines": summary["latent_lines"],
            "first": {k: first.get(k) for k in ("text_loss", "latent_loss")},
            "last": {k: last.get(k) for k in ("text_loss", "latent_loss")}}


def _losses(summary: dict, latent: bool) -> str:
    first, last = summary["first"], summary["last"]
    text = f"text loss {first['text_loss']:.3f} -> {last['text_loss']:.3f}"
    if latent:
        text += f", latent loss {first['latent_loss']:.3f} -> {last['latent_loss']:.3f}"
    return text


def make_base(run: Run) -> tuple[dict, str]:
    from ..data import load_samples
    from ..train import attach_gap

    model, tokenizer = load(run.folder("init"))
    attach_gap(model, tokenizer, None, latent_budget=run.plan.grid ** 2)
    samples = [dict(s, hard=False) for s in load_samples(run.train_file())]  # plain text: no latent step
    summary = _train(run, model.train(), tokenizer, samples, "base", run.plan.base_steps)
    return summary, f"{summary['steps']} steps of plain-text fine-tuning, stopped early: {_losses(summary, False)}"


# ---- the GAP path ----------------------------------------------------------------------------------------

def fit_pca(run: Run) -> tuple[dict, str]:
    """Two heads from one fit: ``head.safetensors`` keeps ``plan.variance`` (GAP), ``head-full`` every direction."""
    from ..data import load_samples, sample_images
    from ..stages.pca import fit_images, write_fit_summary

    model, _ = load(run.folder("base"))
    images = sample_images(load_samples(run.train_file()), latent=True)
    stats = fit_images(model, images, settings=settings(run), progress=run.progress)
    head = stats.fit(run.plan.variance, whiten=run.plan.whiten)
    out = run.folder("pca")
    head.save(os.path.join(out, "head.safetensors"))
    stats.fit(rank=stats.dim, whiten=run.plan.whiten).save(os.path.join(out, "head-full.safetensors"))
    fit = write_fit_summary(stats, head.rank, os.path.join(out, "pca.json"), os.path.join(out, "pca.png"),
                            variance=run.plan.variance)
    summary = {"images": len(images), "embeddings": stats.count, "dim": stats.dim, "d": head.rank,
               "explained": fit["explained_at_d"], "whitened": run.plan.whiten}
    return summary, (f"head d={head.rank} of D={stats.dim} keeps {fit['explained_at_d']:.1%} of the variance "
                     f"of {stats.count} visual embeddings ({len(images)} images and crops); full head d={stats.dim}")


def curate_train(run: Run) -> tuple[dict, str]:
    from ..stages.curate import curate
    from ..data import load_samples

    model, tokenizer = load(run.folder("base"))
    samples = load_samples(run.train_file())
    out = run.folder("curate", "curated.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    curate(model, tokenizer, samples, out, n=run.plan.attempts, temperature=1.0,
           max_new_tokens=run.plan.max_new_tokens, batch=8, seed=run.seed, settings=settings(run),
           suppress=[model.gap.config.latent_start_id], identity={"model": "base"}, progress=run.progress)
    curated = load_samples(out)
    hard = {}
    for sample in curated:
        counts = hard.setdefault(sample["task"], [0, 0])
        counts[0] += sample["hard"]
        counts[1] += 1
    summary = {"lines": len(curated), "hard": sum(h for h, _ in hard.values()),
               "by_task": {t: {"hard": h, "lines": n} for t, (h, n) in hard.items()},
               "base_sample_accuracy": sum(s["n_correct"] for s in curated) / (len(curated) * run.plan.attempts)}
    parts = ", ".join(f"{t} {h}/{n}" for t, (h, n) in hard.items())
    return summary, (f"{summary['hard']} of {len(curated)} lines hard (no attempt of {run.plan.attempts} right): "
                     f"{parts}; the base model's samples are right {summary['base_sample_accuracy']:.1%} of the time")


def _build(run: Run, samples, folder: str, source: str) -> dict:
    from ..stages.build import build_data

    model, _ = load(run.folder("base"))
    summary = build_data(model, samples, run.folder(folder), g=run.plan.grid, profile="gap",
                         model_path=run.folder("base"), source=source, settings=settings(run), progress=run.progress)
    return {k: summary[k] for k in ("lines", "latent_lines", "latent_steps", "K", "dim")}


def build(run: Run) -> tuple[dict, str]:
    """Targets for the hard lines (``data/``: GAP, full-dim) and for every line (``data-all/``: the all-latent arms)."""
    from ..data import load_samples

    source = run.folder("curate", "curated.jsonl")
    curated = load_samples(source)
    hard = _build(run, curated, "data", source)
    every = _build(run, [dict(s, hard=True) for s in curated], "data-all", source)
    return {"hard": hard, "all": every}, (
        f"{hard['latent_steps']} latent targets (K={hard['K']} x D={hard['dim']}) for the {hard['latent_lines']} hard "
        f"lines with a latent step; {every['latent_steps']} for all {every['latent_lines']} lines with one")


def train_arm(run: Run, arm: str) -> tuple[dict, str]:
    from ..stages.build import load_build
    from ..head import PCALatentHead
    from ..train import attach_gap

    name, data_folder, head_file = ARMS[arm]
    data = load_build(run.folder(data_folder))
    model, tokenizer = load(run.folder("base"))
    samples, targets = data.samples, data.targets
    if arm == "text-only":  # every line as plain text: the control
        samples, targets = [dict(s, hard=False) for s in samples], None
    else:
        head = None if head_file is None else PCALatentHead.load(run.folder("pca", head_file))
        attach_gap(model, tokenizer, head, latent_budget=data.settings["K"])
    summary = _train(run, model.train(), tokenizer, samples, name, run.plan.steps, targets=targets)
    return summary, (f"{summary['steps']} steps, {summary['latent_lines']} of {summary['lines']} lines with "
                     f"latents: {_losses(summary, targets is not None)}")


def _fresh(run: Run, name: str) -> None:
    """A stage that did not finish left a partial folder: start it over (curate resumes by itself)."""
    for folder in (name, "data-all") if name == "data" else (name,):
        path = run.folder(folder)
        if name != "curate" and os.path.isdir(path):
            shutil.rmtree(path)


def measure(run: Run) -> tuple[dict, str]:
    from .measure import evaluate_all

    return evaluate_all(run)


def diagnose(run: Run) -> tuple[dict, str]:
    from .measure import diagnose_all

    return diagnose_all(run)


# stage name -> (folder it writes, function); in order
STAGES = {
    "task": ("task", make_task),
    "init": ("init", make_init),
    "base": ("base", make_base),
    "fit-pca": ("pca", fit_pca),
    "curate": ("curate", curate_train),
    "build-data": ("data", build),
    **{f"train-{folder}": (folder, partial(train_arm, arm=arm)) for arm, (folder, _, _) in ARMS.items()},
    "eval": ("eval", measure),
    "diagnose": ("diagnose", diagnose),
}


def run_stage(run: Run, name: str) -> tuple[dict, str]:
    folder, function = STAGES[name]
    _fresh(run, folder)
    return function(run)
