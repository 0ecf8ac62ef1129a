"""What a latent-aware model carries (:class:`GapState`), how it is attached, and its calibration targets.

The calibration targets of SPEC section 2 (tau per row: ``none``, ``rms``,
``ema``, and a continued conversation's rms rows) are built here and nowhere
else: :meth:`GapState.calibration_tau`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ... import ops
from ...config import GapConfig
from ...head import PCALatentHead

MODEL_TYPE = "qwen2_5_vl"
OWN_NORMS = "_gapkern_own_norms"  # on a returned cache: each row's mean visual-embedding norm (0: no image)

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

    def calibration_tau(self, norms: torch.Tensor | None, image_mask: torch.Tensor | None, rows: int,
                        past=None):
        """tau (rows,) float32 for SPEC section 2's calibration, or None for ``none``.

        ``norms`` (N,) are the L2 norms of the visual input embeddings of this
        prefill in prompt order, ``image_mask`` (rows, L) where they sit. Every
        prefill with images updates the running ema target (in both ``ema``
        and ``rms`` mode: it is ``rms``'s fallback for rows without an image).
        ``past``: the cache of a continued conversation; it adds no image, so
        its rms rows keep the norms of their earlier turns (kept on the cache
        by :func:`keep_own_norms`).
        """
        if past is not None:
            return self._continued_tau(past, rows)
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


    def _continued_tau(self, past, rows: int):
        tau = self.calibration_tau(None, None, rows)  # the ema target, or None
        if self.config.calibration != "rms":
            return tau
        own = getattr(past, OWN_NORMS, None)
        if own is None or own.shape[0] != rows:
            raise ValueError("past_key_values: calibration 'rms' needs each row's image norms from the turns this "
                             "cache holds; continue a cache that this patched model's generate returned, or use "
                             "calibration 'ema' or 'none'")
        return torch.where(own > 0, own.to(tau.device), tau)


def row_norms(norms: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean visual-embedding norm (rows,) float32, 0 for a row without image: ``norms`` (N,) in
    prompt order, ``image_mask`` (rows, L) where they sit. The rms target's per-row image norm, once."""
    sums = torch.zeros(image_mask.shape, dtype=torch.float32, device=norms.device)
    return sums.masked_scatter(image_mask, norms.float()).sum(1) / image_mask.sum(1).clamp_min(1)


def own_norms(norms, image_mask, rows, device):
    """Each row's mean visual-embedding norm, 0 for a row without image: rms's target, kept with the cache."""
    if norms is None:
        return torch.zeros(rows, dtype=torch.float32, device=device)
    return row_norms(norms, image_mask)


def keep_own_norms(cache, norms, image_mask, rows, device) -> None:
    """Keep each row's rms target on a returned ``cache``, for the turns that continue it."""
    setattr(cache, OWN_NORMS, own_norms(norms, image_mask, rows, device))


def check_model(model):
    """A Qwen2.5-VL ``...ForConditionalGeneration``, or a TypeError naming what it is."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != MODEL_TYPE or not hasattr(model, "lm_head"):
        raise TypeError(
            f"model: expected a Qwen2_5_VLForConditionalGeneration (model_type {MODEL_TYPE!r}), "
            f"got {type(model).__name__} (model_type {model_type!r})"
        )


def resolve_config(model, config):
    """``config``, or the one saved in ``model.config.gap``; checked against the model's vocabulary."""
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


def attach(model, head, config) -> GapState:
    """Add ``model.gap`` (the head moved to the model's device and dtype) and its JSON form in ``model.config``."""
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

