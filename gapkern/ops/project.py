"""pca_project: coeffs = hidden @ weight + bias, (B, D) x (D, d) -> (B, d); differentiable.

The public function checks, then calls the custom op ``gapkern::pca_project``, which runs the
backend chosen for hidden's device and dtype. The fake impl repeats the shape checks, so they hold
under torch.compile too; the backward runs the same custom op on the transposed operands.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from .backend import module_for


def check(hidden, weight, bias):
    """hidden (B, D), weight (D, d), bias (d,) or None: one dtype, one device."""
    V.head("hidden", hidden, weight, bias)


def pca_project(hidden, weight, bias=None):
    """coeffs = hidden @ weight + bias. (B,D) x (D,d) -> (B,d); differentiable."""
    check(hidden, weight, bias)
    if hidden.shape[0] == 0:
        return hidden.new_empty(0, weight.shape[1])
    return project_op(hidden, weight, bias)


@torch.library.custom_op("gapkern::pca_project", mutates_args=())
def project_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return module_for(hidden.device, hidden.dtype).pca_project(hidden, weight, bias)


@project_op.register_fake
def _(hidden, weight, bias):
    check(hidden, weight, bias)
    return hidden.new_empty(hidden.shape[0], weight.shape[1])


def _setup(ctx, inputs, output):
    hidden, weight, bias = inputs
    ctx.save_for_backward(hidden, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """The backward runs on the same projection op: dh = g W^T, dW = h^T g."""
    hidden, weight = ctx.saved_tensors
    d_hidden = project_op(grad, weight.T, None) if ctx.needs_input_grad[0] else None
    d_weight = project_op(hidden.T, grad, None) if ctx.needs_input_grad[1] else None
    d_bias = grad.float().sum(0).to(grad.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return d_hidden, d_weight, d_bias


project_op.register_autograd(_backward, setup_context=_setup)
