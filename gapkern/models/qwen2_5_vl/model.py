"""The Gap model class: Qwen2.5-VL whose checkpoint carries the GAP parts, and the all-or-nothing save."""
from __future__ import annotations

import inspect
import os
import re

import torch

from ..._io import atomic_folder
from ...config import GapConfig
from ...head import PCALatentHead
from . import hf_compat as hf
from .generate import gap_generate
from .state import GapState, attach, check_model, resolve_config

# A previous save's shards and index, which a new save replaces (transformers deletes such shards too).
_STALE_WEIGHTS = re.compile(r"model(\.[^.]+)?(-\d{5}-of-\d{5}\.(safetensors|bin)|\.safetensors\.index\.json)")


class CheckpointError(ValueError):
    """A checkpoint whose GAP parts (``config.json``'s ``gap``, the ``gap.*`` tensors) are missing or wrong."""


def save_atomically(model, save, save_directory, *args, **kwargs):
    """``save(tmp_folder, ...)`` beside ``save_directory``, then the files moved in: all or none."""
    if "gap" in model._modules:  # config.json describes the state saved, even one changed since patching
        model.config.gap = model.gap.to_dict()
    if kwargs.get("push_to_hub"):  # the hub repo is named after the folder, not the temporary one
        kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(save_directory)))
    atomic_folder(save_directory, lambda tmp: save(tmp, *args, **kwargs),
                  stale=lambda name: _STALE_WEIGHTS.fullmatch(name) is not None)


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
        save_atomically(self, super().save_pretrained, save_directory, *args, **kwargs)

    def set_gap(self, head: PCALatentHead | None, config: GapConfig):
        """Attach (or replace) the head and GapConfig."""
        check_model(self)
        if "gap" in self._modules:
            del self._modules["gap"]
        attach(self, head, resolve_config(self, config))
        return self

    generate = gap_generate

    def forward(self, *args, latent_targets=None, latent_loss_weight=1.0, **kwargs):
        """The base forward; with ``latent_targets`` the teacher-forced training forward (``gapkern.train.gap_forward``)."""
        if latent_targets is None:
            return super().forward(*args, **kwargs)
        if args:
            raise TypeError("forward: pass input_ids and the other inputs by keyword when latent_targets is given")
        from ...train.forward import gap_forward

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


hf.register_checkpoint_layout(GapQwen2_5_VLForConditionalGeneration, _base_class())
