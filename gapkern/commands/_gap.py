"""What the stages that run the latent-aware generate share (eval, diagnose): the GAP options and patching.

A gapkern checkpoint brings its head, GapConfig and running calibration
target; a plain Qwen2.5-VL checkpoint is output-as-input (no head) with a
profile's latent tokens. A plain checkpoint whose tokenizer lacks those tokens
was never trained to write them: they are added, and their start token is
never sampled unless a span is forced (--span-at).
"""
from __future__ import annotations

import dataclasses
import os

from ..config import KEEP_HEAD  # --head not given: the checkpoint's own head (none for a plain checkpoint)
from . import UsageError

CALIBRATIONS = ("none", "rms", "ema")


def add_gap_arguments(parser, *, calibration_help: str, several: bool = True, head_help: str | None = None,
                      budget_help: str | None = None) -> None:
    """--calibration (``several``: a comma-separated list of modes, checked by :func:`calibrations`; else one
    mode), --head, --latent-budget, --profile: declared once for every command that patches a checkpoint."""
    parser.add_argument("--calibration", metavar="MODE[,MODE...]" if several else None,
                        choices=None if several else CALIBRATIONS, help=calibration_help)
    parser.add_argument("--head", metavar="FILE|none",
                        help=head_help or "a PCALatentHead file (gapkern fit-pca), or none for output-as-input "
                                          "(default: the checkpoint's head; none for a plain checkpoint)")
    parser.add_argument("--latent-budget", type=int, metavar="K",
                        help=budget_help or "latents per span (default: the checkpoint's, else 16)")
    parser.add_argument("--profile", choices=("gap", "monet"),
                        help="latent tokens of a plain checkpoint (default gap); added if its tokenizer lacks them")


def calibrations(value: str | None) -> list[str] | None:
    """``--calibration none,ema`` -> ["none", "ema"] (None when not given)."""
    if value is None:
        return None
    modes = [m.strip() for m in value.split(",")]
    bad = [m for m in modes if m not in CALIBRATIONS]
    if bad or not modes:
        raise UsageError(f"--calibration: expected a comma-separated list of {', '.join(CALIBRATIONS)}, "
                         f"got {value!r}")
    if len(set(modes)) != len(modes):
        raise UsageError(f"--calibration: {value!r} names a mode twice")
    return modes


def load_head(value: str | None, dims: dict[str, int]):
    """``--head``: KEEP_HEAD, None (``none``) or a PCALatentHead whose width fits every checkpoint (path -> D)."""
    if value is None:
        return KEEP_HEAD
    if value == "none":
        return None
    head = read_head(value)
    for path, dim in dims.items():
        if head.hidden_size != dim:
            raise UsageError(f"--head: {value!r} has hidden size {head.hidden_size}, the checkpoint {path!r} {dim}")
    return head


def read_head(path: str):
    """The PCALatentHead file ``path``; a missing or damaged one is a one-line --head error."""
    from ..head import PCALatentHead

    try:
        return PCALatentHead.load(path)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise UsageError(f"--head: {exc}") from None


def head_name(head, value: str | None, model) -> str:
    """What settings and reports call the head a run uses."""
    if head is KEEP_HEAD:
        return "checkpoint" if model.gap.head is not None else "none"
    return "none" if head is None else os.path.abspath(value)


def prepare(model, tokenizer, head, *, latent_budget: int | None = None, calibration: str | None = None,
            profile: str | None = None, path: str = "") -> list[int]:
    """Patch a loaded checkpoint for the latent-aware generate, in place; returns the token ids it must not
    sample (the start token of latents it was never trained to write). ``latent_budget`` and ``calibration``,
    when given, replace the checkpoint's (a plain checkpoint's defaults: 16 and none)."""
    import gapkern
    from ..config import PROFILES
    from ..models import add_latent_tokens

    overrides = {k: v for k, v in (("latent_budget", latent_budget), ("calibration", calibration)) if v is not None}
    if "gap" in model._modules:
        config = dataclasses.replace(model.gap.config, **overrides)
        if profile is not None and profile != config.profile:
            raise UsageError(f"--profile: {path!r} was saved with profile {config.profile!r}")
        tau = model.gap.tau_ema.detach().clone()
        gapkern.patch(model, model.gap.head if head is KEEP_HEAD else head, config)
        model.gap.tau_ema.copy_(tau)  # a saved running target survives the new state
        return []
    profile = profile or "gap"
    had = all(token in tokenizer.get_vocab() for token in PROFILES[profile])
    config = add_latent_tokens(tokenizer, model, profile=profile, **overrides)
    gapkern.patch(model, None if head is KEEP_HEAD else head, config)
    return [] if had else [config.latent_start_id]

