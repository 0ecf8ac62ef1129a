"""pca_reconstruct: latents = mean + (coeffs * sigma) @ basis.T, (B, d) -> (B, D).

The public function checks (the basis's orthonormality too: the latent step's norm identity
relies on it), then calls the custom op ``gapkern::pca_reconstruct``; its fake impl repeats the
shape checks, so they hold under torch.compile too. No autograd: training differentiates
:func:`gapkern.ops.latent_step`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from .backend import module_for


def check(coeffs, basis, mean, sigma):
    """coeffs (B, d), basis (D, d), mean (D,) or None, sigma (d,) or None: one dtype, one device."""
    V.tensor("coeffs", coeffs, 2, "(B, d)")
    V.basis_args("coeffs", coeffs, basis, mean, sigma)
    V.size("coeffs", coeffs, 1, basis.shape[1], "d, the columns of basis")


def pca_reconstruct(coeffs, basis, mean=None, sigma=None):
    """latents = mean + (coeffs * sigma) @ basis.T. (B,d) -> (B,D)."""
    check(coeffs, basis, mean, sigma)
    V.check_orthonormal(basis)
    if coeffs.shape[0] == 0:
        return coeffs.new_empty(0, basis.shape[0])
    return reconstruct_op(coeffs, basis, mean, sigma)


@torch.library.custom_op("gapkern::pca_reconstruct", mutates_args=())
def reconstruct_op(coeffs: Tensor, basis: Tensor, mean: Optional[Tensor], sigma: Optional[Tensor]) -> Tensor:
    return module_for(coeffs.device, coeffs.dtype).pca_reconstruct(coeffs, basis, mean, sigma)


@reconstruct_op.register_fake
def _(coeffs, basis, mean, sigma):
    check(coeffs, basis, mean, sigma)
    return coeffs.new_empty(coeffs.shape[0], basis.shape[0])
