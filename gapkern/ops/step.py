"""latent_step: project, whiten, reconstruct, calibrate, write the masked rows (SPEC section 2), and its binder.

One argument order everywhere: ``latent_step(hidden, weight, bias, basis, mean, tau, *, sigma, eps,
latent_mask, out)`` is the order of the custom ops ``gapkern::latent_step`` / ``gapkern::latent_step_out``
and, without ``hidden``, of :func:`bind_latent_step` and of every backend's ``prepare_latent_step``
(gapkern/ops/backend.py).

:func:`latent_step` checks its arguments and always calls a custom op (differentiable without
``out``: the backward differentiates the float32 reference). Their fake impls repeat the shape
checks, so they hold under torch.compile too.

:func:`bind_latent_step` is the decode loop's path: it checks the head, ``tau``, ``latent_mask`` and
``out`` (shapes, dtypes, device, the basis's orthonormality) once, resolves the backend and lets it
prepare what it can (its workspaces, its launch plan). The :class:`LatentStep` it returns is called
with each step's hidden state: it checks that hidden is what the step was bound for and calls the
backend's kernel directly in eager mode. That direct call is kept because the custom-op layer costs
a decode step its Python dispatch (docs/layout-benchmarks.md: ``torch`` vs ``torch-bound``); under
torch.compile (and so inside a captured graph) it goes through ``gapkern::latent_step_out``. The GPU
backends then allocate nothing and wait for nothing (CUDA-graph safe).

A bound step's tensors are bound by reference: write new values into them in place (``tau``,
``latent_mask``, the head's parameters), never rebind them. The basis is checked once, when bound.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _cache, _validate as V
from . import backend as _backend


def check(ref_name: str, ref, weight, bias, basis, mean, tau, sigma, eps, latent_mask, *, values=True):
    """A latent step's arguments against ``ref`` (B, D): ``hidden``, or ``out`` for a bound step.
    ``values=False`` (the fake impls: no values to read) leaves out the basis's orthonormality.

    Returns (tau as a float32 (B,) tensor or None, eps as a float).
    """
    V.tensor(ref_name, ref, 2, "(B, D)")
    rows, dim = ref.shape
    if weight is not None:
        V.head(ref_name, ref, weight, bias)
        if basis is None:
            raise TypeError("basis: expected a (D, d) tensor when weight is given, got None")
        V.basis_args(ref_name, ref, basis, mean, sigma)
        V.size("basis", basis, 0, dim, f"D, the hidden size of {ref_name}")
        V.size("basis", basis, 1, weight.shape[1], "d, the PCA rank of weight")
        if values:
            V.check_orthonormal(basis)  # a Gram product, remembered per tensor
    else:
        for name, t in (("bias", bias), ("basis", basis), ("mean", mean), ("sigma", sigma)):
            if t is not None:
                raise ValueError(f"{name}: must be None when weight is None (identity head)")
    tau = V.as_tau(tau, rows, ref.device)
    V.mask(latent_mask, rows, ref.device)
    return tau, V.eps_value(eps)


def new_latents(hidden, latent_mask):
    """The output of a functional latent step: rows outside the mask are zero."""
    shape = (hidden.shape[0], hidden.shape[1])
    return hidden.new_empty(shape) if latent_mask is None else hidden.new_zeros(shape)


def run(hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask, out):
    """One unbound step (checked arguments): the backend for ``hidden`` prepares it and runs it."""
    backend = _backend.module_for(hidden.device, hidden.dtype)
    backend.prepare_latent_step(weight, bias, basis, mean, tau, sigma, eps, latent_mask, out, _cache.workspace)(hidden)


def latent_step(hidden, weight=None, bias=None, basis=None, mean=None, tau=None, *,
                sigma=None, eps=1e-6, latent_mask=None, out=None):
    """The fused latent step: project, whiten, reconstruct, calibrate, write rows.

    ``weight=None`` is the identity head (latents = hidden); ``tau=None`` skips
    calibration. Without ``out`` a new tensor is returned (rows outside
    ``latent_mask`` are zero). With ``out`` given, only rows where ``latent_mask`` is true
    (all rows when it is None) are written, the others are left untouched,
    and nothing is allocated (CUDA-graph safe when ``tau`` is a tensor).
    """
    tau, eps = check("hidden", hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask)
    rows, dim = hidden.shape
    V.out_like(out, rows, dim, hidden.dtype, hidden.device)
    if rows == 0:
        return hidden.new_empty(0, dim) if out is None else out
    if out is None:
        return step_op(hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask)
    step_out_op(hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask, out)
    return out


# -- the custom ops -------------------------------------------------------------

@torch.library.custom_op("gapkern::latent_step_out", mutates_args=("out",))
def step_out_op(hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], basis: Optional[Tensor],
                mean: Optional[Tensor], tau: Optional[Tensor], sigma: Optional[Tensor], eps: float,
                latent_mask: Optional[Tensor], out: Tensor) -> None:
    run(hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask, out)


@step_out_op.register_fake
def _(hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask, out):
    check("hidden", hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask, values=False)
    V.out_like(out, hidden.shape[0], hidden.shape[1], hidden.dtype, hidden.device)


@torch.library.custom_op("gapkern::latent_step", mutates_args=())
def step_op(hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], basis: Optional[Tensor],
            mean: Optional[Tensor], tau: Optional[Tensor], sigma: Optional[Tensor], eps: float,
            latent_mask: Optional[Tensor]) -> Tensor:
    out = new_latents(hidden, latent_mask)
    run(hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask, out)
    return out


@step_op.register_fake
def _(hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask):
    check("hidden", hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask, values=False)
    return hidden.new_empty(hidden.shape[0], hidden.shape[1])


_SAVED = ("hidden", "weight", "bias", "basis", "mean", "tau", "sigma", "latent_mask")  # all inputs but eps


def _setup(ctx, inputs, output):
    hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask = inputs
    ctx.save_for_backward(hidden, weight, bias, basis, mean, tau, sigma, latent_mask)
    ctx.eps = eps


def _backward(ctx, grad):
    """Recompute the step with the float32 reference and differentiate it.

    The forward ran on the fused kernel; the backward of a (B, D) step is
    cheap next to the model's own backward, so exact autograd of the
    reference is the simplest correct choice.
    """
    from . import _torch

    hidden, weight, bias, basis, mean, tau, sigma, latent_mask = ctx.saved_tensors
    with torch.enable_grad():
        h, w, b = (None if t is None else t.detach().requires_grad_(True) for t in (hidden, weight, bias))
        z = _torch.latents(h, w, b, basis, mean, tau, sigma, ctx.eps)
        if latent_mask is not None:
            z = z * latent_mask[:, None]
        leaves = [t for t in (h, w, b) if t is not None]
        grads = iter(torch.autograd.grad(z, leaves, grad.to(z.dtype), allow_unused=True))
    d_hidden, d_weight, d_bias = (None if t is None else next(grads) for t in (h, w, b))
    return d_hidden, d_weight, d_bias, None, None, None, None, None, None


step_op.register_autograd(_backward, setup_context=_setup)


# -- the bound step ---------------------------------------------------------------

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
            step_out_op(hidden, *self._args, self.out)
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
    """:func:`latent_step` with everything but ``hidden`` fixed: returns ``step``, and
    ``step(hidden)`` is ``latent_step(hidden, weight, bias, basis, mean, tau, sigma=sigma, eps=eps,
    latent_mask=latent_mask, out=out)``, the same numbers, for any ``hidden`` of out's shape, dtype
    and device.

    ``out`` (B, D) is required: it fixes the rows, the hidden size, the dtype and the device. ``tau``
    is a float32 (B,) tensor or a number (made a tensor once, here), ``latent_mask`` a (B,) bool tensor
    or None; both are read at every call, so a loop updates them in place between steps.
    """
    tau, eps = check("out", out, weight, bias, basis, mean, tau, sigma, eps, latent_mask)
    backend = _backend.module_for(out.device, out.dtype)
    args = (weight, bias, basis, mean, tau, sigma, eps, latent_mask)
    kernel = backend.prepare_latent_step(*args, out, _cache.workspace) if out.shape[0] else _nothing
    return LatentStep(kernel, out, args, _backend.name_of(backend))
