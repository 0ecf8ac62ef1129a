"""Teacher-forced GAP training (SPEC 4.5) with transformers.Trainer: a gapkern checkpoint in --out.

Hard lines (and every line of data that was not curated) train with their
latent slots filled by their targets (from gapkern build-data) and the head
supervised on PCA coefficients; easy lines train as plain text. Runs on one
device as it is, on several under ``torchrun`` (DDP; gloo on CPU). Any other
TrainingArguments flag can follow ``--``, e.g.
``-- --lr_scheduler_type cosine --warmup_ratio 0.03 --deepspeed ds.json``.
"""
from __future__ import annotations

import argparse
import os
import shutil

from . import UsageError
from ._common import checkpoint_config, from_pretrained, load_tokenizer, positive_int

NAME = "train"
HELP = "teacher-forced GAP training (transformers.Trainer): text CE + latent coefficient MSE"
DTYPES = ("auto", "float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a Qwen2.5-VL checkpoint folder with its tokenizer (a gapkern one brings its head)")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="a gapkern build-data folder (samples.jsonl, targets/, build.json)")
    parser.add_argument("--curated", metavar="FILE",
                        help="which lines are hard, from gapkern curate's output (default: the data's own 'hard' "
                             "when it was built from a curated file, else every line trains with its latents)")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--head", metavar="FILE", help="a PCALatentHead file from gapkern fit-pca "
                                                      "(default: the checkpoint's head)")
    heads.add_argument("--no-head", action="store_true", help="output-as-input: no head, latents are hidden states")
    parser.add_argument("--profile", choices=("gap", "monet"),
                        help="latent tokens for a plain checkpoint (default: the data's profile)")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoints and the final model go here")
    parser.add_argument("--epochs", type=float, default=1.0, help="default 1")
    parser.add_argument("--max-steps", type=int, default=-1, metavar="N", help="optimizer steps; overrides --epochs")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="rows per device per step (default 1)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="N", help="gradient accumulation steps")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (autocast)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="the weights' dtype, trained and saved (default auto: the checkpoint's own, so a "
                             "bfloat16 checkpoint stays bfloat16; float32 when config.json names none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-steps", type=int, default=500, metavar="N", help="a checkpoint every N steps")
    parser.add_argument("--logging-steps", type=int, default=10, metavar="N", help="log every N steps (default 10)")
    parser.add_argument("--resume", nargs="?", const="last", metavar="CHECKPOINT",
                        help="resume from a checkpoint folder (without a value: the last one in --out)")
    vision = parser.add_mutually_exclusive_group()
    vision.add_argument("--freeze-vision", dest="train_vision", action="store_false",
                        help="keep the vision tower frozen (the default)")
    vision.add_argument("--train-vision", dest="train_vision", action="store_true", help="train the vision tower")
    parser.set_defaults(train_vision=False)  # not store_false's implied True
    parser.add_argument("--keep-checkpoints", type=int, default=1, metavar="N",
                        help="keep the last N checkpoint-STEP folders (full copies, what --resume restarts from; "
                             "default 1); 0: remove them once training has finished, so --out holds one copy")
    parser.add_argument("--freeze-lm", action="store_true",
                        help="train only the head (and what --train-vision adds); the head is also written alone to "
                             "OUT/head.safetensors: the language model is the base's, so keeping that file is "
                             "enough (gapkern eval --model BASE --head OUT/head.safetensors) when the base "
                             "tokenizer has the profile's tokens or room for them (Qwen2.5-VL's 152064 rows do)")
    parser.add_argument("--lora", type=int, metavar="R", help="LoRA of rank R on the language model "
                                                              "(needs peft: pip install 'gapkern[lora]')")
    parser.add_argument("--latent-loss-weight", type=float, default=1.0, metavar="W",
                        help="loss = text_loss + W * latent_loss (default 1)")
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER,
                        help="after --: more TrainingArguments flags, passed to transformers")


def _check(args) -> list[str]:
    for name in ("batch", "grad_accum", "save_steps", "logging_steps"):
        positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    if args.keep_checkpoints < 0:
        raise UsageError(f"--keep-checkpoints: expected 0 or a positive number, got {args.keep_checkpoints}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UsageError(f"--max-steps: expected a positive number of steps, got {args.max_steps}")
    if not args.epochs > 0:
        raise UsageError(f"--epochs: expected a positive number, got {args.epochs}")
    if args.lora is not None:
        positive_int(args.lora, "--lora")
        if args.freeze_lm:
            raise UsageError("--freeze-lm: LoRA already keeps the language model's weights frozen; give one of the two")
    extra = list(args.trainer_args)
    return extra[1:] if extra[:1] == ["--"] else extra


def _data(args):
    """The build-data folder, and its samples with ``hard`` from --curated when given."""
    from ..stages.build import load_build
    from ..train import apply_curation

    try:
        build = load_build(args.data)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--data: {exc}") from None
    if not args.curated:
        return build, build.samples
    try:
        return build, apply_curation(build.samples, args.curated)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _model(args, build):
    """The checkpoint as a Gap Qwen2.5-VL with the head and GapConfig it trains with, and its tokenizer."""
    import torch

    from ..train import KEEP_HEAD, attach_gap
    from ._gap import read_head

    saved = checkpoint_config(args.model).get("gap")
    if not saved and not args.head and not args.no_head:
        raise UsageError(f"--head: {args.model!r} is a plain Qwen2.5-VL checkpoint; pass a PCALatentHead file "
                         "(gapkern fit-pca) or --no-head")
    head = read_head(args.head) if args.head else None if args.no_head else KEEP_HEAD
    tokenizer = load_tokenizer(args.model)
    model = from_pretrained(args.model, getattr(torch, _dtype(args)), gap_class=True)
    try:
        attach_gap(model, tokenizer, head, profile=args.profile or build.settings.get("profile"),
                   latent_budget=build.settings.get("K"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return model, tokenizer


def _dtype(args) -> str:
    """--dtype, auto resolved to the checkpoint's saved dtype (config.json ``dtype``, or ``torch_dtype`` of older
    transformers), float32 when it names none or a dtype training does not take."""
    if args.dtype != "auto":
        return args.dtype
    config = checkpoint_config(args.model)
    saved = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return saved if saved in DTYPES else "float32"


def run(args) -> int:
    from ..data.images import image_settings
    from ..train import train, training_arguments

    extra = _check(args)
    try:
        targs = training_arguments(
            args.out, extra, num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
            per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum, bf16=args.bf16,
            seed=args.seed, save_steps=args.save_steps, logging_steps=args.logging_steps,
            save_total_limit=max(args.keep_checkpoints, 1))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    build, samples = _data(args)
    model, tokenizer = _model(args, build)
    try:
        summary = train(model, tokenizer, samples, args.out, targets=build.targets, args=targs,
                        image_settings=image_settings(args.model), resume=True if args.resume == "last" else args.resume,
                        latent_loss_weight=args.latent_loss_weight, train_vision=args.train_vision,
                        freeze_lm=args.freeze_lm, lora=args.lora)
    except (ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    if summary["main"]:
        _copy_image_settings(args.model, args.out)
        if args.freeze_lm and model.gap.head is not None:
            model.gap.head.save(os.path.join(args.out, "head.safetensors"))
        if args.keep_checkpoints == 0:
            _remove_checkpoints(args.out)
        print(_summary(summary))
    return 0


def _remove_checkpoints(out: str) -> None:
    """The checkpoint-STEP folders of a finished run: full copies of weights the final model already holds."""
    for name in os.listdir(out):
        if name.startswith("checkpoint-") and os.path.isdir(os.path.join(out, name)):
            shutil.rmtree(os.path.join(out, name))


def _copy_image_settings(model: str, out: str) -> None:
    """The image processor's settings travel with the weights: generate resizes images the same way."""
    source = os.path.join(model, "preprocessor_config.json")
    if os.path.isfile(source) and os.path.abspath(model) != os.path.abspath(out):
        shutil.copyfile(source, os.path.join(out, "preprocessor_config.json"))


def _losses(entry) -> str:
    if entry is None:
        return "-"
    parts = [f"loss {entry['loss']:.4f}"] + [f"{k} {entry[k]:.4f}" for k in ("text_loss", "latent_loss") if k in entry]
    return f"step {entry['step']}: " + ", ".join(parts)


def _summary(s: dict) -> str:
    return "\n".join([
        f"trained      {s['steps']} steps on {s['samples']} lines ({s['latent_lines']} with latents) x "
        f"{s['world']} process(es), {s['trainable']:,} trainable parameters, {s['seconds']:.1f} s",
        f"first log    {_losses(s['first'])}",
        f"last log     {_losses(s['last'])}",
        f"saved        {s['out']} (gapkern generate --model {s['out']})",
    ])
