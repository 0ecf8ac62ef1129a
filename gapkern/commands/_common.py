"""What the stage commands share: the model options, the ranks, the sample file (the checkpoint loaders are
``gapkern.loaders``, re-exported here)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..loaders import (TOKENIZER_FILES, checkpoint_config, from_pretrained, gap_settings,  # noqa: F401
                       hidden_size, load_tokenizer)
from . import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a local Qwen2.5-VL checkpoint folder (plain, or saved by gapkern)")
    add_device_arguments(parser)


def add_device_arguments(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N; "
                                                             "under torchrun each rank uses cuda:LOCAL_RANK")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on cuda, else float32")


def positive_int(value: int, option: str) -> int:
    if value < 1:
        raise UsageError(f"{option}: expected a positive integer, got {value}")
    return value


def fraction(value: float, option: str) -> float:
    if not (math.isfinite(value) and 0 < value <= 1):
        raise UsageError(f"{option}: expected a fraction in (0, 1], got {value}")
    return value


def non_negative(value: float, option: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{option}: expected a finite number >= 0, got {value}")
    return value


def add_samples_arguments(parser, help: str = "the sample file (JSONL, SPEC 4.1)") -> None:
    """``--samples`` (a JSONL sample file or a VLMEvalKit TSV) and ``--category`` (a TSV outside gapkern's table)."""
    parser.add_argument("--samples", required=True, metavar="FILE",
                        help=f"{help}, or a VLMEvalKit benchmark TSV (its images decoded once, beside --out)")
    parser.add_argument("--category", choices=("perception", "reasoning"),
                        help="a TSV benchmark's category where gapkern's table (HRBench4K, HRBench8K, MMStar, "
                             "MME-RealWorld-Lite, MathVista_MINI, WeMath) does not know its name")


def read_samples(path: str, *, images: str | None = None, category: str | None = None) -> list[dict]:
    """The validated sample file (JSONL, or a VLMEvalKit TSV whose images are decoded once into ``images``);
    a bad line is a one-line error naming file:line:field."""
    from ..data import load_samples

    try:
        return load_samples(path, images=images, category=category)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--samples: {exc}") from None


@dataclass
class Place:
    """Where this process runs: its rank among ``world`` (1 without torchrun), device and dtype."""

    rank: int
    world: int
    device: object
    dtype: object


def check_temperature(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"--temperature: expected a finite number >= 0 (0 decodes greedily), got {value}")


def check_span_at(value, max_new_tokens: int, never: bool = True) -> None:
    """--span-at: a new position in [0, max_new_tokens), or -1 (never) where ``never`` is allowed."""
    if value is not None and not (-1 if never else 0) <= value < max_new_tokens:
        what = "-1 (never) or a new position" if never else "a new position"
        raise UsageError(f"--span-at: expected {what} in [0, {max_new_tokens}) "
                         f"(--max-new-tokens {max_new_tokens}), got {value}")


def check_out_folder(path: str, *, folder: bool = True) -> None:
    """--out can be written (a folder, or a file when not ``folder``): checked before any work."""
    from ..outputs import OutputError, check_writable

    try:
        check_writable(path, folder=folder, name="--out")
    except OutputError as exc:
        raise UsageError(str(exc)) from None


def device_of(text: str):
    """The torch.device a --device value names (auto: cuda if available), refused with a UsageError
    when it is not a CPU or an existing CUDA device."""
    import torch

    device = text
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device: {text!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def dtype_of(text: str, device):
    """The torch dtype a --dtype value names; auto: bfloat16 on CUDA, float32 elsewhere."""
    import torch

    return getattr(torch, text if text != "auto" else "bfloat16" if device.type == "cuda" else "float32")


def start(args) -> Place:
    """Resolve --device / --dtype; under torchrun join the process group (a rank on CUDA takes cuda:LOCAL_RANK)."""
    import torch

    from .. import distributed

    device = device_of(args.device)
    rank, world, local = distributed.init_from_env(device.type)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    return Place(rank, world, device, dtype_of(args.dtype, device))


def load_model(path: str, place: Place):
    """:func:`from_pretrained` at the place's dtype, in eval mode on its device."""
    return from_pretrained(path, place.dtype).to(place.device).eval()


def load_vision(path: str, place: Place):
    """Only the checkpoint's vision tower and merger (:mod:`gapkern.models.qwen2_5_vl.vision_only`), at the
    place's dtype on its device: what fit-pca and build-data run. A missing or damaged file is a UsageError."""
    from safetensors import SafetensorError

    from ..models.qwen2_5_vl.vision_only import load_vision_tower

    checkpoint_config(path)
    try:
        return load_vision_tower(path, place.dtype, place.device)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model: {' '.join(str(exc).split())}") from None
    except SafetensorError as exc:
        raise UsageError(f"--model: a weights file in {path!r} is damaged ({exc})") from None
