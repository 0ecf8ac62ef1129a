"""Loading a local Qwen2.5-VL checkpoint folder: its config.json, the model (plain or Gap class), its tokenizer.

The commands, the demo and library code load through these; a missing or damaged file is a
:class:`gapkern.errors.UsageError` naming ``--model``.
"""
from __future__ import annotations

import os

from .errors import UsageError

__all__ = ["checkpoint_config", "from_pretrained", "load_tokenizer", "hidden_size", "gap_settings", "TOKENIZER_FILES"]


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
    if _json_object(os.path.join(path, "preprocessor_config.json"), required=False) is not None:
        from .data.images import image_settings

        try:
            image_settings(path)  # each setting of the right type, before any stage reads them
        except ValueError as exc:
            raise UsageError(f"--model: {exc}") from None
    return data


def _json_object(path: str, required: bool = True):
    """A JSON object file of the checkpoint (None when absent and not ``required``)."""
    from ._io import read_json

    if not required and not os.path.isfile(path):
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--model: {path!r} holds a JSON {type(data).__name__}, expected an object")
    return data


def from_pretrained(path: str, dtype=None, *, gap_class: bool = False):
    """``from_pretrained`` on a local checkpoint folder: the Gap class when config.json has a ``"gap"`` entry
    (its head and GapConfig come with it) or ``gap_class`` (a plain checkpoint to attach a head to), else the
    plain Qwen2.5-VL class. ``dtype`` None: transformers' default. A missing or damaged file is a UsageError."""
    import sys

    from safetensors import SafetensorError
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from .models import GapQwen2_5_VLForConditionalGeneration
    from .models.qwen2_5_vl import CheckpointError

    gap = checkpoint_config(path).get("gap") or gap_class
    cls = GapQwen2_5_VLForConditionalGeneration if gap else Qwen2_5_VLForConditionalGeneration
    bars = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # HF's loading bars print even into a log file; ours are quiet there
        hf_logging.disable_progress_bar()
    # transformers' load report (a table of mismatched shapes, logged by modeling_utils since 5.2x, by
    # loading_report before): held back while loading; shown if the load is good, replaced by one line if not
    reports = [hf_logging.get_logger(name) for name in ("transformers.modeling_utils",
                                                        "transformers.utils.loading_report")]
    held = _HeldReports()
    for logger in reports:
        logger.addFilter(held)
    try:
        try:
            model, info = cls.from_pretrained(path, ignore_mismatched_sizes=True, output_loading_info=True,
                                              **({} if dtype is None else {"dtype": dtype}))
        finally:
            for logger in reports:
                logger.removeFilter(held)
        _check_loading(path, info)
        held.release()
        return model
    except (CheckpointError, OSError) as exc:  # OSError: transformers' "no weights file in ..."
        raise UsageError(f"--model: {' '.join(str(exc).split())}") from None
    except SafetensorError as exc:
        raise UsageError(f"--model: a weights file in {path!r} is damaged ({exc})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


class _HeldReports:
    """A logging filter that holds back transformers' LOAD REPORT records; ``release`` logs them after all."""

    def __init__(self):
        self.records = []

    def filter(self, record) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        import logging

        for record in self.records:
            logging.getLogger(record.name).handle(record)


def _check_loading(path: str, info: dict) -> None:
    """A config.json that disagrees with the weights is an error (transformers would reinitialise those
    tensors, or raise after a long report); keys missing from the weights are one warning line."""
    import warnings

    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, saved, wanted = mismatched[0]
        raise UsageError(f"--model: {os.path.join(path, 'config.json')!r} disagrees with the weights in {path!r}: "
                         f"{len(mismatched)} tensor(s) of other shapes (first: {key} is {list(saved)} in the "
                         f"weights, {list(wanted)} by the config); fix config.json or use the checkpoint it "
                         "was saved with")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        warnings.warn(f"{path}: {len(missing)} weight(s) not in the checkpoint, left as initialised "
                      f"(first: {missing[0]})", stacklevel=3)


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
