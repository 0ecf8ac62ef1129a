"""Ops benchmarks: every backend vs eager PyTorch written the obvious way vs
torch.compile of it. GPU: bfloat16 at D in {2048, 3584, 8192}, B in {1, 8, 64,
256}; CPU: small float32 shapes, so the suite runs anywhere.

Run: pytest benchmarks/ --benchmark-only [--benchmark-json=benchmarks/results/NAME.json]
"""
from __future__ import annotations

import pytest
import torch

from gapkern import ops

from conftest import DEVICE, ON_GPU, use_backend

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# (D, d): d is the rank keeping ~95% of variance at 7B, scaled with D.
SHAPES = [(2048, 360), (3584, 629), (8192, 1440)] if ON_GPU else [(512, 64)]
ROWS = [1, 8, 64, 256] if ON_GPU else [1, 8]
BACKENDS = ["cuda", "triton", "torch"]
EPS = 1e-6


def _case(D, d, B):
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))[0]
    t = dict(hidden=torch.randn(B, D, generator=g), weight=torch.randn(D, d, generator=g) / D ** 0.5,
             bias=torch.randn(d, generator=g) * 0.1, basis=U, mean=torch.randn(D, generator=g) * 0.05)
    t = {k: v.to(DTYPE).to(DEVICE) for k, v in t.items()}
    t["tau"] = torch.full((B,), 3.0, device=DEVICE)
    t["mask"] = torch.ones(B, dtype=torch.bool, device=DEVICE)
    t["out"] = torch.empty(B, D, dtype=DTYPE, device=DEVICE)
    return t


def eager_latent_step(hidden, weight, bias, basis, mean, tau, mask, out):
    """The latent step as one would write it in PyTorch."""
    c = hidden @ weight + bias
    z = (mean + c @ basis.T).float()
    z = z * (tau / z.norm(dim=-1).clamp_min(EPS))[:, None]
    out.copy_(torch.where(mask[:, None], z.to(out.dtype), out))


def _step_bytes(D, d, B):
    size = torch.tensor([], dtype=DTYPE).element_size()
    return size * (2 * D * d + 2 * B * D + D + d)  # W, basis, hidden in, latents out, mean, bias


def _impl(name, t):
    if name == "eager":
        return lambda: eager_latent_step(**t)
    if name == "compiled":
        fn = torch.compile(eager_latent_step, fullgraph=True)
        return lambda: fn(**t)
    return lambda: ops.latent_step(t["hidden"], t["weight"], t["bias"], t["basis"], t["mean"], t["tau"],
                                   latent_mask=t["mask"], out=t["out"])


@pytest.mark.parametrize("impl", BACKENDS + ["eager", "compiled"])
@pytest.mark.parametrize("B", ROWS, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"D{s[0]}-d{s[1]}")
def test_latent_step(measure, benchmark, impl, B, shape):
    D, d = shape
    benchmark.group = f"latent_step D{D} d{d} B{B}"
    t = _case(D, d, B)
    with use_backend(impl):
        measure(_impl(impl, t), _step_bytes(D, d, B), op="latent_step", impl=impl, D=D, d=d, B=B,
                dtype=str(DTYPE), device=DEVICE)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("B", ROWS, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"D{s[0]}-d{s[1]}")
def test_pca_project(measure, benchmark, impl, B, shape):
    D, d = shape
    benchmark.group = f"pca_project D{D} d{d} B{B}"
    t = _case(D, d, B)
    size = t["hidden"].element_size()
    with use_backend(impl):
        measure(lambda: ops.pca_project(t["hidden"], t["weight"], t["bias"]), size * (D * d + B * D + B * d),
                op="pca_project", impl=impl, D=D, d=d, B=B, dtype=str(DTYPE), device=DEVICE)
