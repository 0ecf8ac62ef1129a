"""Qwen2.5-VL: patch / unpatch a loaded model, the Gap model class, the calibration targets.

``patch`` binds a latent-aware ``generate`` to one instance
(``model.__dict__["generate"]``) and adds one submodule, ``model.gap``
(:class:`GapState`: the GapConfig, the head, the running ema target).
Nothing at class or module level changes, so other models of the class are
untouched; ``unpatch`` removes exactly what ``patch`` added.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .. import ops
from ..config import GapConfig
from ..head import PCALatentHead
from .generate import gap_generate

MODEL_TYPE = "qwen2_5_vl"
_BOUND = ("generate",)  # instance attributes patch() binds
_MISSING = object()


class GapState(nn.Module):
    """What a latent-aware model carries: ``config``, ``head`` (or None), ``tau_ema``.

    ``tau_ema`` (1,) float32 is the running calibration target, 0 until a
    prefill with images was observed. It is a buffer so that it moves with the
    model and is saved with it; it stays float32 when the model is cast.
    """

    def __init__(self, config: GapConfig, head: PCALatentHead | None = None):
        super().__init__()
        if not isinstance(config, GapConfig):
            raise TypeError(f"config: expected a gapkern.GapConfig, got {type(config).__name__}")
        if head is not None and not isinstance(head, PCALatentHead):
            raise TypeError(f"head: expected a gapkern.PCALatentHead or None, got {type(head).__name__}")
        self.config = config
        self.head = head
        self.register_buffer("tau_ema", torch.zeros(1, dtype=torch.float32))
        self.decoder = None  # the static decoder (and its CUDA graph) kept for the next generate call

    def _apply(self, fn, recurse=True):
        tau = self.tau_ema
        super()._apply(fn, recurse)
        self.tau_ema = (self.tau_ema if tau.is_meta else tau.to(self.tau_ema.device)).float()
        self.decoder = None  # its buffers and graph belong to the old device / dtype
        return self

    def __getstate__(self):  # copies and pickles leave the cached decoder (and its graph) behind
        return {**self.__dict__, "decoder": None}

    def to_dict(self) -> dict:
        """The JSON form kept in ``model.config.gap``: the GapConfig and the head's shape."""
        head = None if self.head is None else {"rank": self.head.rank, "whitened": self.head.sigma is not None}
        return {**self.config.to_dict(), "head": head}

    @classmethod
    def from_dict(cls, data: dict, hidden_size: int) -> "GapState":
        """An empty state of the right shapes; the checkpoint fills in the values."""
        head = None
        if data.get("head"):
            rank, whitened = data["head"]["rank"], data["head"]["whitened"]
            basis = torch.eye(hidden_size, rank)
            head = PCALatentHead(basis, torch.zeros(hidden_size), torch.ones(rank) if whitened else None)
        return cls(GapConfig.from_dict(data), head)

    def targets(self, norms: torch.Tensor | None, image_mask: torch.Tensor | None, rows: int):
        """tau (rows,) float32 for SPEC section 2's calibration, or None for ``none``.

        ``norms`` (N,) are the L2 norms of the visual input embeddings of this
        prefill in prompt order, ``image_mask`` (rows, L) where they sit. Every
        prefill with images updates the running ema target (in both ``ema``
        and ``rms`` mode: it is ``rms``'s fallback for rows without an image).
        """
        mode = self.config.calibration
        if mode == "none":
            return None
        if self.tau_ema.dtype != torch.float32:  # a checkpoint loaded in half precision
            self.tau_ema = self.tau_ema.float()
        if norms is not None and norms.numel():
            ops.ema_update(self.tau_ema, norms.float(), self.config.ema_decay)
        ema = self.tau_ema.expand(rows)
        if mode == "ema" or norms is None:
            return ema.clone()
        counts = image_mask.sum(1)
        sums = torch.zeros(image_mask.shape, dtype=torch.float32, device=norms.device)
        sums = sums.masked_scatter(image_mask, norms.float()).sum(1)
        return torch.where(counts > 0, sums / counts.clamp_min(1), ema)


def _check_model(model):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != MODEL_TYPE or not hasattr(model, "lm_head"):
        raise TypeError(
            f"model: expected a Qwen2_5_VLForConditionalGeneration (model_type {MODEL_TYPE!r}), "
            f"got {type(model).__name__} (model_type {model_type!r})"
        )


def _resolve_config(model, config):
    if config is None:
        data = getattr(model.config, "gap", None)
        if not data:
            raise ValueError("config: pass a gapkern.GapConfig (e.g. GapConfig.from_tokenizer(tokenizer))")
        config = GapConfig.from_dict(data)
    if not isinstance(config, GapConfig):
        raise TypeError(f"config: expected a gapkern.GapConfig, got {type(config).__name__}")
    vocab = model.get_input_embeddings().num_embeddings
    for name in ("latent_start_id", "latent_end_id", "latent_pad_id"):
        if getattr(config, name) >= vocab:
            raise ValueError(f"config: {name}={getattr(config, name)} is outside the vocabulary ({vocab} ids); "
                             "add the profile's tokens first (gapkern.models.add_latent_tokens)")
    return config


def _attach(model, head, config) -> GapState:
    dim = model.config.text_config.hidden_size
    if head is not None:
        if not isinstance(head, PCALatentHead):
            raise TypeError(f"head: expected a gapkern.PCALatentHead or None, got {type(head).__name__}")
        if head.hidden_size != dim:
            raise ValueError(f"head: hidden size {head.hidden_size} does not match the model's {dim}")
        head.to(device=model.device, dtype=model.dtype)
    state = GapState(config, head).to(model.device)
    model.add_module("gap", state)
    model.config.gap = state.to_dict()
    return state


def is_patched(model) -> bool:
    return "_gap_saved" in model.__dict__


def patch(model, head: PCALatentHead | None = None, config: GapConfig | None = None):
    """Make a loaded Qwen2.5-VL model latent-aware, in place; returns it.

    ``head=None`` is output-as-input (the latent is the final-normed hidden
    state); a :class:`PCALatentHead` is GAP. ``config`` defaults to the one in
    ``model.config.gap``. Patching a patched model replaces its head and config.
    """
    _check_model(model)
    if isinstance(model, GapQwen2_5_VLForConditionalGeneration):
        model.set_gap(head, _resolve_config(model, config))
        return model
    config = _resolve_config(model, config)
    if is_patched(model):
        unpatch(model)
    saved = {name: model.__dict__.get(name, _MISSING) for name in _BOUND}
    saved["config.gap"] = getattr(model.config, "gap", _MISSING)
    saved["rope_deltas"] = model.model.rope_deltas
    _attach(model, head, config)
    model.__dict__["generate"] = types.MethodType(gap_generate, model)
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
    model.model.rope_deltas = saved["rope_deltas"]
    return model


def _base_class():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


class GapQwen2_5_VLForConditionalGeneration(_base_class()):
    """Qwen2.5-VL with a latent-aware ``generate`` whose checkpoint carries the GAP parts.

    ``save_pretrained`` writes the head, its PCA buffers and the running ema
    target into ``model.safetensors`` (under ``gap.``) and the GapConfig into
    ``config.json`` (``"gap"``); ``from_pretrained`` reads them back. Loading a
    plain Qwen2.5-VL checkpoint gives a model without GAP parts: add them with
    :meth:`set_gap`.
    """

    def __init__(self, config):
        super().__init__(config)
        data = getattr(config, "gap", None)
        if data:
            self.gap = GapState.from_dict(data, config.text_config.hidden_size)

    def set_gap(self, head: PCALatentHead | None, config: GapConfig):
        """Attach (or replace) the head and GapConfig."""
        _check_model(self)
        if "gap" in self._modules:
            del self._modules["gap"]
        _attach(self, head, _resolve_config(self, config))
        return self

    generate = gap_generate


def _register_checkpoint_layout():
    """Read and write the checkpoint layout of Qwen2.5-VL (``model.layers.*``, ``visual.*``).

    transformers skips its key renaming for classes defined outside it unless
    they are registered by name; registering this class (and only it) lets
    ``from_pretrained`` load hub Qwen2.5-VL checkpoints and saves like the base class.
    """
    from transformers import conversion_mapping as cm

    base = cm.get_checkpoint_conversion_mapping(_base_class().__name__)
    if base is not None:
        cm.register_checkpoint_conversion_mapping(GapQwen2_5_VLForConditionalGeneration.__name__, base,
                                                  overwrite=True)


_register_checkpoint_layout()
