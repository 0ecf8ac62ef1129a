"""Argument checks shared by the ops (each op's own checks are in its file): clear errors that name the argument."""
from __future__ import annotations

import torch

from . import _cache

# float64 runs on the torch backend only (gradcheck, references).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = "float32, bfloat16 or float16 (float64 on the torch backend)"


def tensor(name: str, t, ndim: int, what: str, dtypes=FLOAT_DTYPES, dtype_names=_DTYPE_NAMES):
    """Check that ``t`` is a tensor of rank ``ndim`` and an allowed dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {what}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {dtype_names}, got {t.dtype}")
    return t


def optional(name: str, t, ndim: int, what: str, **kw):
    return None if t is None else tensor(name, t, ndim, what, **kw)


def size(name: str, t, dim: int, expected: int, what: str):
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected size {expected} ({what}) in dim {dim}, got shape {tuple(t.shape)}"
        )


def same_dtype(name: str, t, ref_name: str, ref):
    if t is not None and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {t.dtype}")


def same_device(device: torch.device, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def as_tau(tau, rows: int, device: torch.device):
    """Return ``tau`` as a float32 tensor of shape (rows,), broadcasting a scalar.

    A python number becomes a one-element tensor (an allocation: pass a tensor
    in a captured decode loop). Broadcasting uses a stride-0 view, no copy.
    """
    if tau is None:
        return None
    if isinstance(tau, (int, float)) and not isinstance(tau, bool):
        tau = torch.tensor([float(tau)], dtype=torch.float32, device=device)
    if not isinstance(tau, torch.Tensor):
        raise TypeError(f"tau: expected a float32 tensor of shape ({rows},) or a number, got {type(tau).__name__}")
    if tau.dtype != torch.float32:
        raise TypeError(f"tau: expected dtype torch.float32, got {tau.dtype}")
    same_device(device, tau=tau)
    if tau.numel() == 1 and tau.dim() <= 1:
        return tau.reshape(1).expand(rows)
    if tau.dim() != 1 or tau.shape[0] != rows:
        raise ValueError(f"tau: expected shape ({rows},) (one target norm per row) or a scalar, got {tuple(tau.shape)}")
    return tau


def mask(latent_mask, rows: int, device: torch.device):
    if latent_mask is None:
        return None
    tensor("latent_mask", latent_mask, 1, f"of shape ({rows},)", dtypes=(torch.bool,), dtype_names="torch.bool")
    size("latent_mask", latent_mask, 0, rows, "rows")
    same_device(device, latent_mask=latent_mask)
    return latent_mask


def eps_value(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    return float(eps)


def head(ref_name: str, ref, weight, bias):
    """weight (D, d) and bias (d,) in the dtype and on the device of ``ref`` (B, D)."""
    tensor(ref_name, ref, 2, "(B, D)")
    tensor("weight", weight, 2, "(D, d)")
    size("weight", weight, 0, ref.shape[1], f"D, the hidden size of {ref_name}")
    optional("bias", bias, 1, "(d,)")
    if bias is not None:
        size("bias", bias, 0, weight.shape[1], "d, the PCA rank of weight")
    same_dtype("weight", weight, ref_name, ref)
    same_dtype("bias", bias, ref_name, ref)
    same_device(ref.device, weight=weight, bias=bias)


def basis_args(ref_name: str, ref, basis, mean, sigma):
    """basis (D, d), mean (D,), sigma (d,) in the dtype and on the device of ``ref``; the caller checks
    the sizes it relates to ``ref``, then :func:`check_orthonormal` (a Gram product: last)."""
    tensor("basis", basis, 2, "(D, d)")
    optional("mean", mean, 1, "(D,)")
    if mean is not None:
        size("mean", mean, 0, basis.shape[0], "D, the rows of basis")
    optional("sigma", sigma, 1, "(d,)")
    if sigma is not None:
        size("sigma", sigma, 0, basis.shape[1], "d, the columns of basis")
    for name, t in (("basis", basis), ("mean", mean), ("sigma", sigma)):
        same_dtype(name, t, ref_name, ref)
    same_device(ref.device, basis=basis, mean=mean, sigma=sigma)


def out_like(out, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
    """``out`` None, or a (rows, cols) tensor of ``dtype`` on ``device``."""
    if out is None:
        return
    tensor("out", out, 2, f"({rows}, {cols})")
    if tuple(out.shape) != (rows, cols):
        raise ValueError(f"out: expected shape ({rows}, {cols}), got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype}, got {out.dtype}")
    same_device(device, out=out)


# -- orthonormal bases ---------------------------------------------------------

_UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def orthonormal_tolerance(dtype: torch.dtype) -> float:
    """max |basis.T @ basis - I| allowed: storage rounding of each entry moves a unit column's
    squared norm by up to 2u (u the unit roundoff); 4u leaves room for it, and 1e-4 for float32
    bases computed in float32."""
    return max(4 * _UNIT_ROUNDOFF.get(dtype, 0.0), 1e-4)


def _gram_error(basis) -> float:
    """max |basis.T @ basis - I|, accumulated in float32 (float64 for float64), on basis's device."""
    acc = basis.detach().double() if basis.dtype == torch.float64 else basis.detach().float()
    gram = acc.T @ acc
    gram.diagonal().sub_(1.0)
    return gram.abs().max().item() if gram.numel() else 0.0


def check_orthonormal(basis, name: str = "basis"):
    """Raise ValueError unless ``basis`` (D, d) has orthonormal columns within its dtype's precision.

    A pass is remembered per tensor until it is freed or modified in place (gapkern/ops/_cache.py),
    so a decode loop checks its basis once. The check reads its result back (a host sync on a
    GPU): during CUDA-graph capture, in traced code, and on the meta device (no values), an
    unchecked basis is let through.
    """
    tensor(name, basis, 2, "(D, d)")
    if torch.compiler.is_compiling() or _cache.passed("orthonormal", basis):
        return basis
    if basis.shape[1] > basis.shape[0]:
        raise ValueError(f"{name}: expected at most D = {basis.shape[0]} orthonormal columns, "
                         f"got shape {tuple(basis.shape)}")
    if basis.is_meta or _cache.capturing(basis.device):  # meta: no values yet (a model built to load into)
        return basis
    err = _gram_error(basis)
    tol = orthonormal_tolerance(basis.dtype)
    if not err <= tol:  # NaN fails too
        raise ValueError(f"{name}: expected orthonormal columns ({name}.T @ {name} = I within {tol:g} for "
                         f"{basis.dtype}), got max |{name}.T @ {name} - I| = {err:.3g}")
    _cache.remember_pass("orthonormal", basis)
    return basis
