"""Qwen2.5-VL: patch / unpatch a loaded model, the Gap model class, the calibration targets.

``patch`` binds a latent-aware ``generate`` and an all-or-nothing
``save_pretrained`` to one instance (``model.__dict__``) and adds one
submodule, ``model.gap`` (:class:`GapState`: the GapConfig, the head, the
running ema target).
Nothing at class or module level changes, so other models of the class are
untouched; ``unpatch`` removes exactly what ``patch`` added.
"""
from __future__ import annotations

import inspect
import os
import re
import types
from collections.abc import Mapping

import torch
from torch import nn

from .. import ops
from .._io import atomic_folder
from ..config import GapConfig
from ..head import PCALatentHead
from .generate import gap_generate
from .loop_inputs import row_norms

MODEL_TYPE = "qwen2_5_vl"
_BOUND = ("generate", "save_pretrained")  # instance attributes patch() binds
_MISSING = object()
# A previous save's shards and index, which a new save replaces (transformers deletes such shards too).
_STALE_WEIGHTS = re.compile(r"model(\.[^.]+)?(-\d{5}-of-\d{5}\.(safetensors|bin)|\.safetensors\.index\.json)")


class CheckpointError(ValueError):
    """A checkpoint whose GAP parts (``config.json``'s ``gap``, the ``gap.*`` tensors) are missing or wrong."""


def check_ids(config: GapConfig, vocab: int) -> None:
    """The latent ids must be in the vocabulary, or spans never open (the start id is never sampled)."""
    for name in ("latent_start_id", "latent_end_id", "latent_pad_id"):
        if getattr(config, name) >= vocab:
            raise ValueError(f"config: {name}={getattr(config, name)} is outside the vocabulary ({vocab} ids); "
                             "add the profile's tokens first (gapkern.models.add_latent_tokens)")


def _head_spec(spec, hidden_size: int):
    """``{"rank": d, "whitened": bool}`` (the head's shape in ``model.config.gap``) or None."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or set(spec) != {"rank", "whitened"}:
        raise ValueError(f"head: expected null or {{\"rank\": d, \"whitened\": true|false}}, got {spec!r}")
    rank, whitened = spec["rank"], spec["whitened"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= hidden_size:
        raise ValueError(f"head: rank: expected an int in [1, {hidden_size}] (the hidden size), got {rank!r}")
    if not isinstance(whitened, bool):
        raise ValueError(f"head: whitened: expected true or false, got {whitened!r}")
    return rank, whitened


class GapState(nn.Module):
    """What a latent-aware model carries: ``config``, ``head`` (or None), ``tau_ema``.

    ``tau_ema`` (1,) float32 is the running calibration target, 0 until a
    prefill with images was observed. It is a buffer so that it moves with the
    model and is saved with it; it stays float32 when the model is cast.
    """

    def __init__(self, config: GapConfig, head: PCALatentHead | None = None, vocab_size: int | None = None):
        super().__init__()
        if head is not None and not isinstance(head, PCALatentHead):
            raise TypeError(f"head: expected a gapkern.PCALatentHead or None, got {type(head).__name__}")
        self.vocab_size = vocab_size
        self.decoder = None  # the static decoder (and its CUDA graph) kept for the next generate call
        self.config = config
        self.head = head
        self.register_buffer("tau_ema", torch.zeros(1, dtype=torch.float32))

    @property
    def config(self) -> GapConfig:
        return self._config

    @config.setter
    def config(self, config: GapConfig):  # a new config is checked like the first (a GapConfig is frozen)
        if not isinstance(config, GapConfig):
            raise TypeError(f"config: expected a gapkern.GapConfig, got {type(config).__name__}")
        if self.vocab_size is not None:
            check_ids(config, self.vocab_size)
        self._config = config

    def _apply(self, fn, recurse=True):
        tau = self.tau_ema
        super()._apply(fn, recurse)
        self.tau_ema = (self.tau_ema if tau.is_meta else tau.to(self.tau_ema.device)).float()
        self.decoder = None  # its buffers and graph belong to the old device / dtype
        return self

    def release(self) -> None:
        """Drop the decoder kept for the next generate call: its static KV cache, buffers and CUDA graph
        are freed once nothing else holds them (call ``torch.cuda.empty_cache()`` after it to hand the
        memory back to the driver). The next static generate builds a new one."""
        self.decoder = None

    def __getstate__(self):  # copies and pickles leave the cached decoder (and its graph) behind
        return {**self.__dict__, "decoder": None}

    def to_dict(self) -> dict:
        """The JSON form kept in ``model.config.gap``: the GapConfig and the head's shape."""
        head = None if self.head is None else {"rank": self.head.rank, "whitened": self.head.sigma is not None}
        return {**self.config.to_dict(), "head": head}

    @staticmethod
    def split(data: Mapping) -> tuple[dict, object]:
        """``model.config.gap`` -> (the GapConfig fields, the head's shape or None)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"gap: expected a dict of GapConfig fields and 'head', got {type(data).__name__}")
        return {k: v for k, v in data.items() if k != "head"}, data.get("head")

    @classmethod
    def from_dict(cls, data: Mapping, hidden_size: int, vocab_size: int | None = None) -> "GapState":
        """An empty state of the right shapes; the checkpoint fills in the values."""
        fields, spec = cls.split(data)
        config, spec = GapConfig.from_dict(fields), _head_spec(spec, hidden_size)
        head = None
        if spec is not None:
            rank, whitened = spec
            basis = torch.eye(hidden_size, rank)
            head = PCALatentHead(basis, torch.zeros(hidden_size), torch.ones(rank) if whitened else None)
        return cls(config, head, vocab_size)

    def validate(self) -> "GapState":
        """Check values filled in after construction (a checkpoint load): the head's, and ``tau_ema``
        (0 or NaN: nothing observed yet; a negative or infinite target would scale every latent)."""
        if self.head is not None:
            self.head.validate()
        tau = self.tau_ema
        if not tau.is_meta and bool((tau < 0).any() | tau.isinf().any()):
            raise ValueError(f"tau_ema: expected a non-negative finite target norm (0 or NaN: none yet), "
                             f"got {tau.tolist()}")
        return self

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
        return torch.where(image_mask.any(1), row_norms(norms, image_mask), ema)


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
        try:
            config = GapConfig.from_dict(GapState.split(data)[0])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"config: model.config.gap: {exc}") from None
    if not isinstance(config, GapConfig):
        raise TypeError(f"config: expected a gapkern.GapConfig, got {type(config).__name__}")
    check_ids(config, model.get_input_embeddings().num_embeddings)
    return config


def _attach(model, head, config) -> GapState:
    dim = model.config.text_config.hidden_size
    if head is not None:
        if not isinstance(head, PCALatentHead):
            raise TypeError(f"head: expected a gapkern.PCALatentHead or None, got {type(head).__name__}")
        if head.hidden_size != dim:
            raise ValueError(f"head: hidden size {head.hidden_size} does not match the model's {dim}")
        head.to(device=model.device, dtype=model.dtype)
    state = GapState(config, head, model.get_input_embeddings().num_embeddings).to(model.device)
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
    model.model.rope_deltas = saved["rope_deltas"]
    return model


def _save_atomically(model, save, save_directory, *args, **kwargs):
    """``save(tmp_folder, ...)`` beside ``save_directory``, then the files moved in: all or none."""
    if "gap" in model._modules:  # config.json describes the state saved, even one changed since patching
        model.config.gap = model.gap.to_dict()
    if kwargs.get("push_to_hub"):  # the hub repo is named after the folder, not the temporary one
        kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(save_directory)))
    atomic_folder(save_directory, lambda tmp: save(tmp, *args, **kwargs),
                  stale=lambda name: _STALE_WEIGHTS.fullmatch(name) is not None)


def _patched_save_pretrained(self, save_directory, *args, **kwargs):
    """Hugging Face's ``save_pretrained``, but a failed write leaves the folder as it was."""
    _save_atomically(self, type(self).save_pretrained.__get__(self), save_directory, *args, **kwargs)


def _with_latent_arguments(base_forward) -> inspect.Signature:
    sig = inspect.signature(base_forward)
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in (("latent_targets", None), ("latent_loss_weight", 1.0))]
    return sig.replace(parameters=params[:at] + extra + params[at:])


def _base_class():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


class GapQwen2_5_VLForConditionalGeneration(_base_class()):
    """Qwen2.5-VL with a latent-aware ``generate`` whose checkpoint carries the GAP parts.

    ``save_pretrained`` writes the head, its PCA buffers and the running ema
    target into ``model.safetensors`` (under ``gap.``) and the GapConfig into
    ``config.json`` (``"gap"``), all files or none; ``from_pretrained`` reads them
    back and checks them (:class:`CheckpointError`). Loading a plain Qwen2.5-VL
    checkpoint gives a model without GAP parts: add them with :meth:`set_gap`.
    """

    def __init__(self, config):
        super().__init__(config)
        data = getattr(config, "gap", None)
        if data:
            text = config.text_config
            try:
                self.gap = GapState.from_dict(data, text.hidden_size, text.vocab_size)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"config.json 'gap': {exc}") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Hugging Face's ``from_pretrained``; the GAP parts are checked: a ``gap.head.*`` tensor missing
        from the weights is an error (not uninitialised memory), a missing ``gap.tau_ema`` starts at 0
        (nothing observed yet, as for an output-as-input checkpoint given a ``gap`` entry by hand)."""
        want_info = kwargs.pop("output_loading_info", False)
        where = os.fspath(pretrained_model_name_or_path)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args,
                                                  output_loading_info=True, **kwargs)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        if "gap" in model._modules:
            _check_loaded(model, info, where)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Hugging Face's ``save_pretrained``, but a failed write leaves the folder as it was."""
        _save_atomically(self, super().save_pretrained, save_directory, *args, **kwargs)

    def set_gap(self, head: PCALatentHead | None, config: GapConfig):
        """Attach (or replace) the head and GapConfig."""
        _check_model(self)
        if "gap" in self._modules:
            del self._modules["gap"]
        _attach(self, head, _resolve_config(self, config))
        return self

    generate = gap_generate

    def forward(self, *args, latent_targets=None, latent_loss_weight=1.0, **kwargs):
        """The base forward; with ``latent_targets`` the teacher-forced training forward (``gapkern.train.gap_forward``)."""
        if latent_targets is None:
            return super().forward(*args, **kwargs)
        if args:
            raise TypeError("forward: pass input_ids and the other inputs by keyword when latent_targets is given")
        from ..train.forward import gap_forward

        return gap_forward(self, latent_targets=latent_targets, latent_loss_weight=latent_loss_weight, **kwargs)

    # the base signature plus the two latent arguments: transformers reads it (logits_to_keep, label names)
    forward.__signature__ = _with_latent_arguments(_base_class().forward)


def _check_loaded(model, info, where):
    mismatched = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}
    bad = sorted(k for k in set(info.get("missing_keys", ())) | mismatched
                 if k.startswith("gap.") and k != "gap.tau_ema")
    if bad:
        raise CheckpointError(
            f"{where}: config.json has a 'gap' entry with a head, but the weights lack (or have other shapes "
            f"for) {', '.join(bad)}; save with GapQwen2_5_VLForConditionalGeneration.save_pretrained, or drop "
            "'head' from config.json's 'gap' and attach a head with set_gap")
    if "gap.tau_ema" in info.get("missing_keys", ()) or "gap.tau_ema" in mismatched:
        model.gap.tau_ema = torch.zeros(1, dtype=torch.float32, device=model.gap.tau_ema.device)
    try:
        model.gap.validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the weights' gap.* tensors: {exc}") from None


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
