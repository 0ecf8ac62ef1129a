"""The latent-step ops (SPEC section 2). Backend chosen at call time.

Each public function checks its arguments, handles the empty batch, then
either calls the selected backend directly (eager, no autograd: the fast
path for a decode loop) or goes through the ``torch.library`` custom op
(under ``torch.compile`` or when a gradient is needed). A decode loop that
knows its shapes binds the step once instead (:func:`bind_latent_step`): it is
checked and resolved then, and each step goes straight to the kernel.
"""
from __future__ import annotations

import torch

from . import _validate as V
from ._backends import State, Status, backend_info, backend_status, get_backend, module_for, set_backend, use_backend
from ._cache import clear_caches
from ._step import LatentStep, bind_latent_step, run_latent_step
from ._validate import check_orthonormal
from . import _custom

__all__ = [
    "pca_project", "pca_reconstruct", "norm_calibrate", "ema_update", "reembed", "latent_step",
    "bind_latent_step", "LatentStep",
    "set_backend", "get_backend", "use_backend", "backend_info", "backend_status", "State", "Status",
    "check_orthonormal", "clear_caches",
]


def _eager(*tensors) -> bool:
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return not (grad and any(t is not None and t.requires_grad for t in tensors))


def pca_project(hidden, weight, bias=None):
    """coeffs = hidden @ weight + bias. (B,D) x (D,d) -> (B,d); differentiable."""
    V.head("hidden", hidden, weight, bias)
    if hidden.shape[0] == 0:
        return hidden.new_empty(0, weight.shape[1])
    if _eager(hidden, weight, bias):
        return module_for(hidden.device, hidden.dtype).pca_project(hidden, weight, bias)
    return torch.ops.gapkern.pca_project(hidden, weight, bias)


def pca_reconstruct(coeffs, basis, mean=None, sigma=None):
    """latents = mean + (coeffs * sigma) @ basis.T. (B,d) -> (B,D)."""
    V.tensor("coeffs", coeffs, 2, "(B, d)")
    V.basis_args("coeffs", coeffs, basis, mean, sigma)
    V.size("coeffs", coeffs, 1, basis.shape[1], "d, the columns of basis")
    V.check_orthonormal(basis)
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
    V.out_like(out, rows, embed_weight.shape[1], embed_weight.dtype, token_ids.device)
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
    tau, eps = V.latent_step_args("hidden", hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask)
    rows, dim = hidden.shape
    V.out_like(out, rows, dim, hidden.dtype, hidden.device)
    if rows == 0:
        return hidden.new_empty(0, dim) if out is None else out
    args = (hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask)
    if out is None:
        if _eager(hidden, weight, bias):
            out = _custom.new_latents(hidden, latent_mask)
            run_latent_step(*args, out)
            return out
        return torch.ops.gapkern.latent_step(*args)
    if _eager():
        run_latent_step(*args, out)
    else:
        torch.ops.gapkern.latent_step_out(*args, out)
    return out
