"""Ops benchmarks: every backend vs eager PyTorch written the obvious way vs
torch.compile of it. ``BACKEND-bound`` is the step a decode loop runs: bound once
(``gapkern.ops.bind_latent_step``), then called per step. GPU: bfloat16 at D in
{2048, 3584, 8192}, B in {1, 8, 64, 256}; CPU: small float32 shapes, so the
suite runs anywhere.

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
    if name.endswith("-bound"):
        step = ops.bind_latent_step(t["weight"], t["bias"], t["basis"], t["mean"], t["tau"], latent_mask=t["mask"],
                                    out=t["out"])
        return lambda: step(t["hidden"])
    return lambda: ops.latent_step(t["hidden"], t["weight"], t["bias"], t["basis"], t["mean"], t["tau"],
                                   latent_mask=t["mask"], out=t["out"])


def _run(measure, benchmark, op, impl, shape, B, make, bytes_moved):
    """Benchmark ``make(case)()``: op ``op`` on ``impl`` (a backend, BACKEND-bound, or a baseline)."""
    D, d = shape
    benchmark.group = f"{op} D{D} d{d} B{B}"
    t = _case(D, d, B)
    with use_backend(impl.removesuffix("-bound")):
        measure(make(t), bytes_moved, op=op, impl=impl, D=D, d=d, B=B, dtype=str(DTYPE), device=DEVICE)


@pytest.mark.parametrize("impl", BACKENDS + [f"{name}-bound" for name in BACKENDS] + ["eager", "compiled"])
@pytest.mark.parametrize("B", ROWS, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"D{s[0]}-d{s[1]}")
def test_latent_step(measure, benchmark, impl, B, shape):
    _run(measure, benchmark, "latent_step", impl, shape, B, lambda t: _impl(impl, t), _step_bytes(*shape, B))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("B", ROWS, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"D{s[0]}-d{s[1]}")
def test_pca_project(measure, benchmark, impl, B, shape):
    D, d = shape
    size = torch.tensor([], dtype=DTYPE).element_size()
    _run(measure, benchmark, "pca_project", impl, shape, B,
         lambda t: lambda: ops.pca_project(t["hidden"], t["weight"], t["bias"]), size * (D * d + B * D + B * d))
