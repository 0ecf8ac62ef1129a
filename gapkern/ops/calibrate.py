"""norm_calibrate: latents * tau / max(||latents||_2, eps) row by row; rows with tau <= 0 unchanged.

The public function checks (a number ``tau`` becomes a float32 tensor here), then calls the
custom op ``gapkern::norm_calibrate``; its fake impl repeats the checks, so they hold under
torch.compile too. No autograd: training differentiates :func:`gapkern.ops.latent_step`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as V
from .backend import module_for


def check(latents, tau, eps):
    """latents (B, D); tau a float32 (B,) tensor or a number; eps > 0. Returns (tau as (B,), eps)."""
    V.tensor("latents", latents, 2, "(B, D)")
    if tau is None:
        raise TypeError("tau: expected a float32 tensor of shape (B,) or a number, got None")
    return V.as_tau(tau, latents.shape[0], latents.device), V.eps_value(eps)


def norm_calibrate(latents, tau, eps=1e-6):
    """latents * tau / max(||latents||_2, eps), row by row; rows with tau <= 0 unchanged."""
    tau, eps = check(latents, tau, eps)
    if latents.shape[0] == 0:
        return torch.empty_like(latents)
    return calibrate_op(latents, tau, eps)


@torch.library.custom_op("gapkern::norm_calibrate", mutates_args=())
def calibrate_op(latents: Tensor, tau: Tensor, eps: float) -> Tensor:
    return module_for(latents.device, latents.dtype).norm_calibrate(latents, tau, eps)


@calibrate_op.register_fake
def _(latents, tau, eps):
    check(latents, tau, eps)
    return torch.empty_like(latents)
