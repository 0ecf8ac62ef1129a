"""What the stage commands share: the model options, loading a local checkpoint, the ranks, the sample file."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

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


def checkpoint_config(path: str) -> dict:
    """The checkpoint's config.json, after checking that it is a Qwen2.5-VL folder (and that its
    preprocessor_config.json, read later for the image settings, is a JSON object when present)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise UsageError(f"--model: no checkpoint folder at {path!r} (expected a folder with config.json)")
    data = _json_object(config)
    if data.get("model_type") != "qwen2_5_vl":
        raise UsageError(f"--model: {path!r} holds a {data.get('model_type')!r} checkpoint; "
                         "expected Qwen2.5-VL (model_type 'qwen2_5_vl')")
    _json_object(os.path.join(path, "preprocessor_config.json"), required=False)
    return data


def _json_object(path: str, required: bool = True):
    """A JSON object file of the checkpoint (None when absent and not ``required``)."""
    from .._io import read_json

    if not required and not os.path.isfile(path):
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--model: {path!r} holds a JSON {type(data).__name__}, expected an object")
    return data


def read_samples(path: str) -> list[dict]:
    """The validated sample file; a bad line is a one-line error naming file:line:field."""
    from ..data import load_samples

    try:
        return load_samples(path)
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


def check_out_folder(path: str) -> None:
    if os.path.isfile(path):
        raise UsageError(f"--out: {path!r} is a file; expected a folder")


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


def from_pretrained(path: str, dtype=None, *, gap_class: bool = False):
    """``from_pretrained`` on a local checkpoint folder: the Gap class when config.json has a ``"gap"`` entry
    (its head and GapConfig come with it) or ``gap_class`` (a plain checkpoint to attach a head to), else the
    plain Qwen2.5-VL class. ``dtype`` None: transformers' default. A missing or damaged file is a UsageError."""
    import sys

    from safetensors import SafetensorError
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from ..models import GapQwen2_5_VLForConditionalGeneration
    from ..models.qwen2_5_vl import CheckpointError

    gap = checkpoint_config(path).get("gap") or gap_class
    cls = GapQwen2_5_VLForConditionalGeneration if gap else Qwen2_5_VLForConditionalGeneration
    bars = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # HF's loading bars print even into a log file; ours are quiet there
        hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
    except (CheckpointError, OSError) as exc:  # OSError: transformers' "no weights file in ..."
        raise UsageError(f"--model: {' '.join(str(exc).split())}") from None
    except SafetensorError as exc:
        raise UsageError(f"--model: a weights file in {path!r} is damaged ({exc})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, with a chat template (the processor's chat_template.json if need be:
    ``AutoTokenizer`` reads a chat_template.jinja itself, not the processor's JSON)."""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"--model: no tokenizer in {path!r}; save it beside the weights "
                         "(tokenizer.save_pretrained(PATH)): the prompt is built with its chat template")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers and tokenizers raise many kinds for a damaged tokenizer file
        raise UsageError(f"--model: the tokenizer in {path!r} does not load: {' '.join(str(exc).split())}") from None
    if not tokenizer.chat_template:
        js = os.path.join(path, "chat_template.json")
        if not os.path.isfile(js):
            raise UsageError(f"--model: the tokenizer in {path!r} has no chat template")
        template = _json_object(js).get("chat_template")
        if not isinstance(template, str):
            raise UsageError(f"--model: {js!r} has no 'chat_template' string")
        tokenizer.chat_template = template
    return tokenizer


def hidden_size(config: dict) -> int:
    """D, the language model's width, from a checkpoint's config.json."""
    return (config.get("text_config") or config)["hidden_size"]


def gap_settings(config: dict) -> dict:
    """The GapConfig fields a gapkern-saved checkpoint's config.json carries ({} for a plain checkpoint)."""
    return config.get("gap") or {}
