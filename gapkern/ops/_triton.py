"""Triton backend: the six protocol functions of ``_torch.py`` on the kernels of ``triton_kernels/``.

Arguments arrive validated (see ``gapkern/ops/__init__.py``). Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors.
"""
from __future__ import annotations

from gapkern.triton_kernels import calibrate, ema, latent_step as step, project, reconstruct, reembed as embed

from . import _cache


def pca_project(hidden, weight, bias):
    return project.project(hidden, weight, bias)


def pca_reconstruct(coeffs, basis, mean, sigma):
    return reconstruct.reconstruct(coeffs, basis, mean, sigma)


def norm_calibrate(latents, tau, eps):
    return calibrate.calibrate(latents, tau, eps)


def ema_update(tau_state, observed, decay):
    ema.update(tau_state, observed, decay)


def reembed(token_ids, latents, latent_mask, embed_weight, out):
    embed.reembed(token_ids, latents, latent_mask, embed_weight, out)


def latent_step(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out):
    step.latent_step(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out, _cache.workspace)
