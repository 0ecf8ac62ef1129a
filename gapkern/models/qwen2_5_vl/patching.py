"""Qwen2.5-VL: patch / unpatch a loaded model in place.

``patch`` binds a latent-aware ``generate`` and an all-or-nothing
``save_pretrained`` to one instance (``model.__dict__``) and adds one
submodule, ``model.gap`` (:class:`~.state.GapState`: the GapConfig, the head,
the running ema target). Nothing at class or module level changes, so other
models of the class are untouched; ``unpatch`` removes exactly what ``patch``
added.
"""
from __future__ import annotations

import types

from ...config import GapConfig
from ...head import PCALatentHead
from . import hf_compat as hf
from .generate import gap_generate
from .model import GapQwen2_5_VLForConditionalGeneration, save_atomically
from .state import attach, check_model, resolve_config

_BOUND = ("generate", "save_pretrained")  # instance attributes patch() binds
_MISSING = object()


def is_patched(model) -> bool:
    return "_gap_saved" in model.__dict__


def patch(model, head: PCALatentHead | None = None, config: GapConfig | None = None):
    """Make a loaded Qwen2.5-VL model latent-aware, in place; returns it.

    ``head=None`` is output-as-input (the latent is the final-normed hidden
    state); a :class:`PCALatentHead` is GAP. ``config`` defaults to the one in
    ``model.config.gap``. Patching a patched model replaces its head and config.
    """
    check_model(model)
    if isinstance(model, GapQwen2_5_VLForConditionalGeneration):
        model.set_gap(head, resolve_config(model, config))
        return model
    config = resolve_config(model, config)
    if is_patched(model):
        unpatch(model)
    saved = {name: model.__dict__.get(name, _MISSING) for name in _BOUND}
    saved["config.gap"] = getattr(model.config, "gap", _MISSING)
    saved["rope_deltas"] = hf.rope_deltas(model)
    attach(model, head, config)
    model.__dict__["generate"] = types.MethodType(gap_generate, model)
    model.__dict__["save_pretrained"] = types.MethodType(_patched_save_pretrained, model)
    model.__dict__["_gap_saved"] = saved
    return model


def unpatch(model):
    """Restore exactly what :func:`patch` changed; returns the model."""
    saved = model.__dict__.pop("_gap_saved", None)
    if saved is None:
        return model
    for name in _BOUND:
        if saved[name] is _MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = saved[name]
    del model._modules["gap"]
    if saved["config.gap"] is _MISSING:
        model.config.__dict__.pop("gap", None)
    else:
        model.config.gap = saved["config.gap"]
    hf.set_rope_deltas(model, saved["rope_deltas"])
    return model


def _patched_save_pretrained(self, save_directory, *args, **kwargs):
    """Hugging Face's ``save_pretrained``, but a failed write leaves the folder as it was."""
    save_atomically(self, type(self).save_pretrained.__get__(self), save_directory, *args, **kwargs)
