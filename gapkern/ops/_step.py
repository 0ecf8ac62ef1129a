"""The latent step bound once: checked and resolved when a decode loop is set up, one kernel call a step.

:func:`bind_latent_step` checks the head, ``tau``, ``latent_mask`` and ``out`` (shapes, dtypes,
device, the basis's orthonormality), resolves the backend and lets it prepare what it can (its
workspaces, its launch plan). The :class:`LatentStep` it returns is called with each step's
hidden state: it checks that hidden is what the step was bound for (shape, dtype, device) and calls
the backend's kernel: no re-validation, no dispatch, no custom-op layer in eager mode. The GPU
backends then allocate nothing and wait for nothing (CUDA-graph safe).

The tensors are bound by reference: write new values into them in place (``tau``,
``latent_mask``, the head's parameters), never rebind them. The basis is checked once, here.
"""
from __future__ import annotations

import torch

from . import _backends, _cache, _validate as V


def latent_kernel(backend, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out):
    """``backend``'s latent step for these validated tensors: a callable ``kernel(hidden)`` writing ``out``."""
    return backend.bind_latent_step(weight, bias, basis, mean, sigma, tau, eps, latent_mask, out, _cache.workspace)


def run_latent_step(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out):
    """One unbound step (validated arguments): the backend for ``hidden`` binds it and runs it."""
    backend = _backends.module_for(hidden.device, hidden.dtype)
    latent_kernel(backend, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out)(hidden)


def _nothing(hidden):
    """The step of an empty batch."""


class LatentStep:
    """``step(hidden)`` writes the latents of ``hidden`` (B, D) into the rows of ``out`` that
    ``latent_mask`` selects (every row without a mask) and returns ``out``.

    ``backend`` names the backend it runs on, chosen when it was bound: a later ``set_backend``
    does not move it. Under ``torch.compile`` a call goes through the ``gapkern::latent_step_out``
    custom op instead (traceable; the backend is then resolved when the compiled code runs).
    """

    def __init__(self, kernel, out, args, backend: str):
        self.out, self.backend = out, backend
        self._kernel, self._args = kernel, args
        self._shape, self._dtype, self._device = out.shape, out.dtype, out.device

    def __call__(self, hidden):
        if torch.compiler.is_compiling():
            torch.ops.gapkern.latent_step_out(hidden, *self._args, self.out)
            return self.out
        if (not isinstance(hidden, torch.Tensor) or hidden.shape != self._shape or hidden.dtype != self._dtype
                or hidden.device != self._device):
            raise ValueError(self._mismatch(hidden))
        self._kernel(hidden)
        return self.out

    def _mismatch(self, hidden) -> str:
        got = (f"{tuple(hidden.shape)} {hidden.dtype} on {hidden.device}" if isinstance(hidden, torch.Tensor)
               else type(hidden).__name__)
        return f"hidden: expected a {tuple(self._shape)} {self._dtype} tensor on {self._device} " \
               f"(the out this step was bound to), got {got}"

    def __repr__(self) -> str:
        return f"LatentStep(backend={self.backend!r}, out={tuple(self._shape)} {self._dtype} on {self._device})"


def bind_latent_step(weight=None, bias=None, basis=None, mean=None, tau=None, *, sigma=None, eps=1e-6,
                     latent_mask=None, out) -> LatentStep:
    """:func:`gapkern.ops.latent_step` with everything but ``hidden`` fixed: returns ``step``, and
    ``step(hidden)`` is ``latent_step(hidden, weight, bias, basis, mean, tau, sigma=sigma, eps=eps,
    latent_mask=latent_mask, out=out)``, the same numbers, for any ``hidden`` of out's shape, dtype
    and device.

    ``out`` (B, D) is required: it fixes the rows, the hidden size, the dtype and the device. ``tau``
    is a float32 (B,) tensor or a number (made a tensor once, here), ``latent_mask`` a (B,) bool tensor
    or None; both are read at every call, so a loop updates them in place between steps.
    """
    tau, eps = V.latent_step_args("out", out, weight, bias, basis, mean, sigma, tau, eps, latent_mask)
    backend = _backends.module_for(out.device, out.dtype)
    args = (weight, bias, basis, mean, sigma, tau, eps, latent_mask)
    kernel = latent_kernel(backend, *args, out) if out.shape[0] else _nothing
    return LatentStep(kernel, out, args, _backends.name_of(backend))
