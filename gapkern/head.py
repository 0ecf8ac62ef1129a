"""PCALatentHead: predicts d PCA coefficients, rebuilt into a latent by the basis."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from . import ops
from ._io import atomic_save_file, load_file


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
        ops._validate.tensor("mean", mean, 1, "(D,)")
        ops._validate.size("mean", mean, 0, basis.shape[0], "D, the rows of basis")
        if sigma is not None:
            ops._validate.tensor("sigma", sigma, 1, "(d,)")
            ops._validate.size("sigma", sigma, 0, basis.shape[1], "d, the columns of basis")
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

    def save(self, path: str) -> None:
        """Write the head to one safetensors file (atomically)."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if v is not None}
        atomic_save_file(tensors, path, metadata={"gapkern": json.dumps({"whitened": self.sigma is not None})})

    @classmethod
    def load(cls, path: str, device=None) -> "PCALatentHead":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no head file at {path!r}")
        tensors = load_file(path, device=str(device or "cpu"))
        for key in ("basis", "mean", "weight", "bias"):
            if key not in tensors:
                raise ValueError(f"path: {path!r} is not a PCALatentHead file (no {key!r} tensor)")
        head = cls(tensors["basis"], tensors["mean"], tensors.get("sigma"))
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
        return head
