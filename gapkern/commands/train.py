"""Teacher-forced GAP training (SPEC 4.5) with transformers.Trainer: a gapkern checkpoint in --out.

Hard lines (from --curated; all lines without it) train with latent slots
filled by their targets and the head supervised on PCA coefficients; easy
lines train as plain text. Runs on one device as it is, on several under
``torchrun`` (DDP; gloo on CPU). Any other TrainingArguments flag can follow
``--``, e.g. ``-- --lr_scheduler_type cosine --warmup_ratio 0.03 --deepspeed ds.json``.
"""
from __future__ import annotations

import argparse

from . import UsageError

NAME = "train"
HELP = "teacher-forced GAP training (transformers.Trainer): text CE + latent coefficient MSE"
DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a Qwen2.5-VL checkpoint folder with its tokenizer (a gapkern one brings its head)")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="a gapkern build-data folder (samples.jsonl and the target shards)")
    parser.add_argument("--curated", metavar="FILE", help="gapkern curate's output: which lines are hard "
                                                          "(default: every line trains with its latents)")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--head", metavar="FILE", help="a PCALatentHead file from gapkern fit-pca "
                                                      "(default: the checkpoint's head)")
    heads.add_argument("--no-head", action="store_true", help="output-as-input: no head, latents are hidden states")
    parser.add_argument("--profile", choices=("gap", "monet"), help="latent tokens for a plain checkpoint (gap)")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoints and the final model go here")
    parser.add_argument("--epochs", type=float, default=1.0, help="default 1")
    parser.add_argument("--max-steps", type=int, default=-1, metavar="N", help="optimizer steps; overrides --epochs")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="rows per device per step (default 1)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="N", help="gradient accumulation steps")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (autocast)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the weights' dtype (default float32)")
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
    parser.add_argument("--freeze-lm", action="store_true", help="train only the head (and what --train-vision adds)")
    parser.add_argument("--lora", type=int, metavar="R", help="LoRA of rank R on the language model "
                                                              "(needs peft: pip install 'gapkern[lora]')")
    parser.add_argument("--latent-loss-weight", type=float, default=1.0, metavar="W",
                        help="loss = text_loss + W * latent_loss (default 1)")
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER,
                        help="after --: more TrainingArguments flags, passed to transformers")


def _check(args) -> list[str]:
    for name in ("batch", "grad_accum", "save_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UsageError(f"--max-steps: expected a positive number of steps, got {args.max_steps}")
    if not args.epochs > 0:
        raise UsageError(f"--epochs: expected a positive number, got {args.epochs}")
    if args.lora is not None and args.lora < 1:
        raise UsageError(f"--lora: expected a positive rank, got {args.lora}")
    if args.lora is not None and args.freeze_lm:
        raise UsageError("--freeze-lm: LoRA already keeps the language model's weights frozen; give one of the two")
    extra = list(args.trainer_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return extra


def run(args) -> int:
    extra = _check(args)
    import torch

    from ..train import train

    try:
        summary = train(args.model, args.data, args.out, curated=args.curated, head=args.head,
                        no_head=args.no_head, profile=args.profile, epochs=args.epochs, max_steps=args.max_steps,
                        lr=args.lr, batch=args.batch, grad_accum=args.grad_accum, bf16=args.bf16, seed=args.seed,
                        save_steps=args.save_steps, logging_steps=args.logging_steps, resume=args.resume,
                        train_vision=args.train_vision, freeze_lm=args.freeze_lm, lora=args.lora,
                        latent_loss_weight=args.latent_loss_weight, dtype=getattr(torch, args.dtype),
                        trainer_args=extra)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    if summary["world"] > 1 and not _is_rank_zero():
        return 0
    print(_summary(summary))
    return 0


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _losses(entry) -> str:
    if entry is None:
        return "-"
    parts = [f"loss {entry['loss']:.4f}"] + [f"{k} {entry[k]:.4f}" for k in ("text_loss", "latent_loss") if k in entry]
    return f"step {entry['step']}: " + ", ".join(parts)


def _summary(s: dict) -> str:
    return "\n".join([
        f"trained      {s['steps']} steps on {s['samples']} lines ({s['hard']} hard) x {s['world']} process(es), "
        f"{s['trainable']:,} trainable parameters, {s['seconds']:.1f} s",
        f"first log    {_losses(s['first'])}",
        f"last log     {_losses(s['last'])}",
        f"saved        {s['out']} (gapkern generate --model {s['out']})",
    ])
