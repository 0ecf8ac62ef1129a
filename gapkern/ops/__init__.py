"""The latent-step ops (SPEC section 2). Backend chosen at call time.

Each public function checks its arguments, handles the empty batch, then
either calls the selected backend directly (eager, no autograd: the fast
path for a decode loop) or goes through the ``torch.library`` custom op
(under ``torch.compile`` or when a gradient is needed).
"""
from __future__ import annotations

import torch

from . import _validate as V
from ._backends import backend_info, get_backend, module_for, set_backend
from ._cache import clear_caches
from ._validate import check_orthonormal
from . import _custom

__all__ = [
    "pca_project", "pca_reconstruct", "norm_calibrate", "ema_update", "reembed", "latent_step",
    "set_backend", "get_backend", "backend_info", "check_orthonormal", "clear_caches",
]


def _eager(*tensors) -> bool:
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return not (grad and any(t is not None and t.requires_grad for t in tensors))


def _check_head(hidden, weight, bias):
    V.tensor("hidden", hidden, 2, "(B, D)")
    V.tensor("weight", weight, 2, "(D, d)")
    V.size("weight", weight, 0, hidden.shape[1], "D, the hidden size of hidden")
    V.optional("bias", bias, 1, "(d,)")
    if bias is not None:
        V.size("bias", bias, 0, weight.shape[1], "d, the PCA rank of weight")
    V.same_dtype("weight", weight, "hidden", hidden)
    V.same_dtype("bias", bias, "hidden", hidden)
    V.same_device(hidden.device, weight=weight, bias=bias)


def _check_basis(ref_name, ref, basis, mean, sigma):
    """basis (D, d), mean (D,), sigma (d,) in the dtype and on the device of ``ref``."""
    V.tensor("basis", basis, 2, "(D, d)")
    V.optional("mean", mean, 1, "(D,)")
    if mean is not None:
        V.size("mean", mean, 0, basis.shape[0], "D, the rows of basis")
    V.optional("sigma", sigma, 1, "(d,)")
    if sigma is not None:
        V.size("sigma", sigma, 0, basis.shape[1], "d, the columns of basis")
    for name, t in (("basis", basis), ("mean", mean), ("sigma", sigma)):
        V.same_dtype(name, t, ref_name, ref)
    V.same_device(ref.device, basis=basis, mean=mean, sigma=sigma)
    V.check_orthonormal(basis)


def _check_out(out, rows, cols, dtype, device):
    if out is None:
        return
    V.tensor("out", out, 2, f"({rows}, {cols})")
    if tuple(out.shape) != (rows, cols):
        raise ValueError(f"out: expected shape ({rows}, {cols}), got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype}, got {out.dtype}")
    V.same_device(device, out=out)


def pca_project(hidden, weight, bias=None):
    """coeffs = hidden @ weight + bias. (B,D) x (D,d) -> (B,d); differentiable."""
    _check_head(hidden, weight, bias)
    if hidden.shape[0] == 0:
        return hidden.new_empty(0, weight.shape[1])
    if _eager(hidden, weight, bias):
        return module_for(hidden.device, hidden.dtype).pca_project(hidden, weight, bias)
    return torch.ops.gapkern.pca_project(hidden, weight, bias)


def pca_reconstruct(coeffs, basis, mean=None, sigma=None):
    """latents = mean + (coeffs * sigma) @ basis.T. (B,d) -> (B,D)."""
    V.tensor("coeffs", coeffs, 2, "(B, d)")
    _check_basis("coeffs", coeffs, basis, mean, sigma)
    V.size("coeffs", coeffs, 1, basis.shape[1], "d, the columns of basis")
    if coeffs.shape[0] == 0:
        return coeffs.new_empty(0, basis.shape[0])
    if _eager():
        return module_for(coeffs.device, coeffs.dtype).pca_reconstruct(coeffs, basis, mean, sigma)
    return torch.ops.gapkern.pca_reconstruct(coeffs, basis, mean, sigma)


def norm_calibrate(latents, tau, eps=1e-6):
    """latents * tau / max(||latents||_2, eps), row by row; rows with tau <= 0 unchanged."""
    V.tensor("latents", latents, 2, "(B, D)")
    if tau is None:
        raise TypeError("tau: expected a float32 tensor of shape (B,) or a number, got None")
    tau = V.as_tau(tau, latents.shape[0], latents.device)
    eps = V.eps_value(eps)
    if latents.shape[0] == 0:
        return torch.empty_like(latents)
    if _eager():
        return module_for(latents.device, latents.dtype).norm_calibrate(latents, tau, eps)
    return torch.ops.gapkern.norm_calibrate(latents, tau, eps)


def ema_update(tau_state, observed, decay=0.99):
    """tau <- decay * tau + (1 - decay) * mean(observed); the first observation initialises it.

    ``tau_state`` is a float32 (1,) tensor, 0 (or NaN) until something was
    observed; it is updated in place and returned. No host sync.
    """
    V.tensor("tau_state", tau_state, 1, "(1,)", dtypes=(torch.float32,), dtype_names="torch.float32")
    V.size("tau_state", tau_state, 0, 1, "one running target")
    V.tensor("observed", observed, 1, "(N,) of norms")
    V.same_device(tau_state.device, observed=observed)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
    if observed.shape[0] == 0:
        return tau_state
    if _eager():
        module_for(tau_state.device, observed.dtype).ema_update(tau_state, observed, float(decay))
    else:
        torch.ops.gapkern.ema_update(tau_state, observed, float(decay))
    return tau_state


def reembed(token_ids, latents, latent_mask, embed_weight, out=None):
    """embeds[b] = latents[b] if latent_mask[b] else embed_weight[token_ids[b]].

    Latent rows' ids are placeholders (any value); a text row's id outside [0, V) is an error:
    a ValueError for CPU tensors, a device-side assert on a GPU (no host sync).
    """
    V.tensor("token_ids", token_ids, 1, "(B,)", dtypes=(torch.int64, torch.int32), dtype_names="int64 or int32")
    rows = token_ids.shape[0]
    V.tensor("embed_weight", embed_weight, 2, "(V, D)")
    V.tensor("latents", latents, 2, f"({rows}, D)")
    V.size("latents", latents, 0, rows, "B, the rows of token_ids")
    V.size("latents", latents, 1, embed_weight.shape[1], "D, the width of embed_weight")
    if latent_mask is None:
        raise TypeError(f"latent_mask: expected a bool tensor of shape ({rows},), got None")
    V.mask(latent_mask, rows, token_ids.device)
    V.same_device(token_ids.device, latents=latents, embed_weight=embed_weight)
    _check_out(out, rows, embed_weight.shape[1], embed_weight.dtype, token_ids.device)
    V.token_ids_in_range(token_ids, latent_mask, embed_weight.shape[0])
    if out is None:
        out = embed_weight.new_empty(rows, embed_weight.shape[1])
    if rows == 0:
        return out
    if _eager():
        module_for(token_ids.device, embed_weight.dtype).reembed(token_ids, latents, latent_mask, embed_weight, out)
    else:
        torch.ops.gapkern.reembed_out(token_ids, latents, latent_mask, embed_weight, out)
    return out


def latent_step(hidden, weight=None, bias=None, basis=None, mean=None, tau=None, *,
                sigma=None, eps=1e-6, latent_mask=None, out=None):
    """The fused latent step: project, whiten, reconstruct, calibrate, write rows.

    ``weight=None`` is the identity head (latents = hidden); ``tau=None`` skips
    calibration. Without ``out`` a new tensor is returned (rows outside
    ``latent_mask`` are zero). With ``out`` given, only rows where ``latent_mask`` is true
    (all rows when it is None) are written, the others are left untouched,
    and nothing is allocated (CUDA-graph safe when ``tau`` is a tensor).
    """
    V.tensor("hidden", hidden, 2, "(B, D)")
    rows, dim = hidden.shape
    if weight is not None:
        _check_head(hidden, weight, bias)
        if basis is None:
            raise TypeError("basis: expected a (D, d) tensor when weight is given, got None")
        _check_basis("hidden", hidden, basis, mean, sigma)
        V.size("basis", basis, 0, dim, "D, the hidden size of hidden")
        V.size("basis", basis, 1, weight.shape[1], "d, the PCA rank of weight")
    else:
        for name, t in (("bias", bias), ("basis", basis), ("mean", mean), ("sigma", sigma)):
            if t is not None:
                raise ValueError(f"{name}: must be None when weight is None (identity head)")
    tau = V.as_tau(tau, rows, hidden.device)
    eps = V.eps_value(eps)
    V.mask(latent_mask, rows, hidden.device)
    _check_out(out, rows, dim, hidden.dtype, hidden.device)
    if rows == 0:
        return hidden.new_empty(0, dim) if out is None else out
    args = (hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask)
    if out is None:
        if _eager(hidden, weight, bias):
            out = _custom.new_latents(hidden, latent_mask)
            module_for(hidden.device, hidden.dtype).latent_step(*args, out)
            return out
        return torch.ops.gapkern.latent_step(*args)
    if _eager():
        module_for(hidden.device, hidden.dtype).latent_step(*args, out)
    else:
        torch.ops.gapkern.latent_step_out(*args, out)
    return out
