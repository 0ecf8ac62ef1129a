"""PCALatentHead: predicts d PCA coefficients, rebuilt into a latent by the basis."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from . import ops
from ._io import atomic_save_file, read_safetensors

_TENSORS = ("basis", "mean", "sigma", "weight", "bias")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not t.is_meta and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or inf of {t.numel()}")


def _check_sigma(sigma: torch.Tensor) -> None:
    # weight and bias are divided by sigma: a zero gives inf, a negative flips the coefficient
    _check_finite("sigma", sigma)
    if not sigma.is_meta and not bool((sigma > 0).all()):
        raise ValueError(f"sigma: expected positive values (square roots of the PCA eigenvalues), "
                         f"got min {float(sigma.min()):g}")


class PCALatentHead(nn.Module):
    """c = h @ weight + bias; latent = mean + (c * sigma) @ basis.T.

    ``basis`` (D, d) has orthonormal columns, ``mean`` (D,), ``sigma`` (d,) the
    square roots of the PCA eigenvalues (whitened coefficients) or None.
    The head starts as the exact PCA projection of its input,
    ``c = basis.T (h - mean) / sigma``, which training then adapts.
    """

    def __init__(self, basis: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor | None = None):
        super().__init__()
        ops._validate.tensor("basis", basis, 2, "(D, d)")
        if not 1 <= basis.shape[1] <= basis.shape[0]:
            raise ValueError(f"basis: expected shape (D, d) with 1 <= d <= D, got {tuple(basis.shape)}")
        ops._validate.tensor("mean", mean, 1, "(D,)")
        ops._validate.size("mean", mean, 0, basis.shape[0], "D, the rows of basis")
        _check_finite("basis", basis)
        _check_finite("mean", mean)
        if sigma is not None:
            ops._validate.tensor("sigma", sigma, 1, "(d,)")
            ops._validate.size("sigma", sigma, 0, basis.shape[1], "d, the columns of basis")
            _check_sigma(sigma)
        self.register_buffer("basis", ops.check_orthonormal(basis.detach().contiguous().clone()))
        self.register_buffer("mean", mean.detach().clone().to(basis.dtype))
        self.register_buffer("sigma", None if sigma is None else sigma.detach().clone().to(basis.dtype))
        weight = basis.detach().float()
        bias = -(mean.detach().float() @ weight)
        if sigma is not None:
            weight = weight / sigma.float()
            bias = bias / sigma.float()
        self.weight = nn.Parameter(weight.to(basis.dtype).contiguous())
        self.bias = nn.Parameter(bias.to(basis.dtype))

    @property
    def hidden_size(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The predicted coefficients (B, d)."""
        return ops.pca_project(hidden, self.weight, self.bias)

    def latents(self, hidden, tau=None, *, eps=1e-6, latent_mask=None, out=None):
        """The fused latent step through this head."""
        return ops.latent_step(hidden, self.weight, self.bias, self.basis, self.mean, tau,
                               sigma=self.sigma, eps=eps, latent_mask=latent_mask, out=out)

    def target_coeffs(self, targets: torch.Tensor) -> torch.Tensor:
        """Training targets: basis.T (t - mean), divided by sigma when whitened."""
        c = (targets.float() - self.mean.float()) @ self.basis.float()
        return c if self.sigma is None else c / self.sigma.float()

    def validate(self) -> "PCALatentHead":
        """Check tensors filled in after construction (a checkpoint load): the constructor's checks
        on the buffers, and finite weight and bias. Returns the head."""
        type(self)(self.basis, self.mean, self.sigma)
        _check_finite("weight", self.weight)
        _check_finite("bias", self.bias)
        return self

    def save(self, path: str) -> None:
        """Write the head to one safetensors file (atomically)."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if v is not None}
        atomic_save_file(tensors, path, metadata={"gapkern": json.dumps({"whitened": self.sigma is not None})})

    @classmethod
    def load(cls, path: str, device=None) -> "PCALatentHead":
        """Read a head written by :meth:`save`; a file that is not one is a ValueError naming it."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no head file at {path!r}")
        tensors, metadata = read_safetensors(path)  # checked on the host: a head file is small
        try:
            head = cls._from_tensors(tensors, metadata)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"path: {path!r}: {exc}") from None
        return head if device is None else head.to(device)

    @classmethod
    def _from_tensors(cls, tensors: dict, metadata: dict) -> "PCALatentHead":
        for key in ("basis", "mean", "weight", "bias"):
            if key not in tensors:
                raise ValueError(f"not a PCALatentHead file (no {key!r} tensor)")
        unknown = sorted(set(tensors) - set(_TENSORS))
        if unknown:
            raise ValueError(f"not a PCALatentHead file (unexpected tensor(s) {', '.join(map(repr, unknown))})")
        try:
            whitened = json.loads(metadata["gapkern"])["whitened"] if "gapkern" in metadata else None
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"damaged metadata {metadata['gapkern']!r}") from None
        if whitened is not None and whitened != ("sigma" in tensors):
            raise ValueError(f"the metadata says whitened={whitened} but the file {'lacks' if whitened else 'has'} "
                             "a 'sigma' tensor")
        basis = ops._validate.tensor("tensor 'basis'", tensors["basis"], 2, "(D, d)")
        dims = {"D": basis.shape[0], "d": basis.shape[-1]}
        for key, shape in (("mean", ("D",)), ("sigma", ("d",)), ("weight", ("D", "d")), ("bias", ("d",))):
            t = tensors.get(key)
            if t is None:
                continue
            want = tuple(dims[s] for s in shape)
            ops._validate.tensor(f"tensor {key!r}", t, len(shape), f"({', '.join(shape)})")
            if tuple(t.shape) != want:
                raise ValueError(f"tensor {key!r}: expected shape {want} ({', '.join(shape)} of basis "
                                 f"{tuple(basis.shape)}), got {tuple(t.shape)}")
            ops._validate.same_dtype(f"tensor {key!r}", t, "tensor 'basis'", basis)
        head = cls(basis, tensors["mean"], tensors.get("sigma"))
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
        _check_finite("weight", head.weight)
        _check_finite("bias", head.bias)
        return head
