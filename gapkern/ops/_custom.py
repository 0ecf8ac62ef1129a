"""``torch.library`` custom ops, so torch.compile traces through the kernels
and autograd reaches the head parameters.

``gapkern::latent_step_out`` declares ``out`` mutated: that is what lets a
compiled or captured decode step write the next input embeddings in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backends import module_for
from ._step import run_latent_step


def new_latents(hidden, latent_mask):
    """The output of a functional latent step: rows outside the mask are zero."""
    shape = (hidden.shape[0], hidden.shape[1])
    if latent_mask is None:
        return hidden.new_empty(shape)
    return hidden.new_zeros(shape)


# -- pca_project --------------------------------------------------------------

@torch.library.custom_op("gapkern::pca_project", mutates_args=())
def pca_project(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return module_for(hidden.device, hidden.dtype).pca_project(hidden, weight, bias)


@pca_project.register_fake
def _(hidden, weight, bias):
    return hidden.new_empty(hidden.shape[0], weight.shape[1])


def _project_setup(ctx, inputs, output):
    hidden, weight, bias = inputs
    ctx.save_for_backward(hidden, weight)
    ctx.has_bias = bias is not None


def _project_backward(ctx, grad):
    """The backward runs on the same projection kernel: dh = g W^T, dW = h^T g."""
    from . import pca_project as project

    hidden, weight = ctx.saved_tensors
    d_hidden = project(grad, weight.T) if ctx.needs_input_grad[0] else None
    d_weight = project(hidden.T, grad) if ctx.needs_input_grad[1] else None
    d_bias = grad.float().sum(0).to(grad.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return d_hidden, d_weight, d_bias


pca_project.register_autograd(_project_backward, setup_context=_project_setup)


# -- the other ops (no autograd) ---------------------------------------------

@torch.library.custom_op("gapkern::pca_reconstruct", mutates_args=())
def pca_reconstruct(coeffs: Tensor, basis: Tensor, mean: Optional[Tensor], sigma: Optional[Tensor]) -> Tensor:
    return module_for(coeffs.device, coeffs.dtype).pca_reconstruct(coeffs, basis, mean, sigma)


@pca_reconstruct.register_fake
def _(coeffs, basis, mean, sigma):
    return coeffs.new_empty(coeffs.shape[0], basis.shape[0])


@torch.library.custom_op("gapkern::norm_calibrate", mutates_args=())
def norm_calibrate(latents: Tensor, tau: Tensor, eps: float) -> Tensor:
    return module_for(latents.device, latents.dtype).norm_calibrate(latents, tau, eps)


@norm_calibrate.register_fake
def _(latents, tau, eps):
    return torch.empty_like(latents)


@torch.library.custom_op("gapkern::ema_update", mutates_args=("tau_state",))
def ema_update(tau_state: Tensor, observed: Tensor, decay: float) -> None:
    module_for(tau_state.device, observed.dtype).ema_update(tau_state, observed, decay)


@ema_update.register_fake
def _(tau_state, observed, decay):
    return None


@torch.library.custom_op("gapkern::reembed_out", mutates_args=("out",))
def reembed_out(token_ids: Tensor, latents: Tensor, latent_mask: Tensor, embed_weight: Tensor,
                out: Tensor) -> None:
    module_for(token_ids.device, embed_weight.dtype).reembed(token_ids, latents, latent_mask, embed_weight, out)


@reembed_out.register_fake
def _(token_ids, latents, latent_mask, embed_weight, out):
    return None


# -- latent_step --------------------------------------------------------------

@torch.library.custom_op("gapkern::latent_step_out", mutates_args=("out",))
def latent_step_out(hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    basis: Optional[Tensor], mean: Optional[Tensor], sigma: Optional[Tensor],
                    tau: Optional[Tensor], eps: float, latent_mask: Optional[Tensor],
                    out: Tensor) -> None:
    run_latent_step(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out)


@latent_step_out.register_fake
def _(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out):
    return None


@torch.library.custom_op("gapkern::latent_step", mutates_args=())
def latent_step(hidden: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                basis: Optional[Tensor], mean: Optional[Tensor], sigma: Optional[Tensor],
                tau: Optional[Tensor], eps: float, latent_mask: Optional[Tensor]) -> Tensor:
    out = new_latents(hidden, latent_mask)
    run_latent_step(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out)
    return out


@latent_step.register_fake
def _(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask):
    return hidden.new_empty(hidden.shape[0], hidden.shape[1])


def _step_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7], inputs[8])
    ctx.eps = inputs[7]


def _step_backward(ctx, grad):
    """Recompute the step with the float32 reference and differentiate it.

    The forward ran on the fused kernel; the backward of a (B, D) step is
    cheap next to the model's own backward, so exact autograd of the
    reference is the simplest correct choice.
    """
    from . import _torch

    hidden, weight, bias, basis, mean, sigma, tau, latent_mask = ctx.saved_tensors
    wanted = [t for t in (hidden, weight, bias) if t is not None]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in wanted]
        it = iter(leaves)
        h = next(it)
        w = next(it) if weight is not None else None
        b = next(it) if bias is not None else None
        z = _torch.latents(h, w, b, basis, mean, sigma, tau, ctx.eps)
        if latent_mask is not None:
            z = z * latent_mask[:, None]
        grads = torch.autograd.grad(z, leaves, grad.to(z.dtype), allow_unused=True)
    it = iter(grads)
    d_hidden = next(it)
    d_weight = next(it) if weight is not None else None
    d_bias = next(it) if bias is not None else None
    return d_hidden, d_weight, d_bias, None, None, None, None, None, None


latent_step.register_autograd(_step_backward, setup_context=_step_setup)
