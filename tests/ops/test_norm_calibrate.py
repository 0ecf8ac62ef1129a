"""norm_calibrate: parity with the float64 reference, zero rows, the float32 limits."""
from __future__ import annotations

import pytest
import torch

from gapkern import ops

import reference as R
from cases import Case, case_for, device_for, dtypes, grid, rows, shapes


@grid
@dtypes
@shapes
@rows
def test_norm_calibrate_matches_reference(backend, dtype, shape, B):
    c = case_for(backend, shape, B, dtype)
    R.assert_matches(ops.norm_calibrate(c.hidden, c.tau), R.calibrate(c.hidden, c.tau))


@grid
@dtypes
def test_zero_vectors_stay_zero(backend, dtype):
    device = device_for(backend)
    D, d = 200, 37
    hidden = torch.zeros(3, D, dtype=dtype, device=device)
    tau = torch.full((3,), 4.0, device=device)
    for got in (ops.latent_step(hidden, tau=tau), ops.norm_calibrate(hidden, tau)):
        assert torch.isfinite(got).all() and (got == 0).all()
    c = Case(D, d, 3, dtype, device)
    zero_mean = torch.zeros(D, dtype=dtype, device=device)
    got = ops.latent_step(hidden, c.weight, None, c.basis, zero_mean, tau, sigma=c.sigma)
    assert torch.isfinite(got).all() and (got == 0).all()


EXTREMES = [
    pytest.param(torch.float32, 1e30, 1e-6, id="f32-1e30"),
    pytest.param(torch.bfloat16, 1e38, 1e-6, id="bf16-near-max"),
    pytest.param(torch.float32, 1e-30, 1e-35, id="f32-1e-30-tiny-eps"),  # squares underflow
    pytest.param(torch.bfloat16, 1e-30, 1e-35, id="bf16-1e-30-tiny-eps"),
]


@grid
@pytest.mark.parametrize("dtype,scale,eps", EXTREMES)
def test_calibration_near_float32_limits(backend, dtype, scale, eps):
    """||z|| is taken without overflow or underflow of the squares: norm_calibrate and the identity step."""
    device = device_for(backend)
    latents = (torch.randn(3, 200, dtype=torch.float64).clamp(-3, 3) * scale).to(dtype).to(device)
    latents[2] = latents[2, 0]  # a constant row: every square the same
    tau = torch.tensor([2.0, 0.5, 7.0], device=device)
    ref = R.calibrate(latents, tau, eps)
    R.assert_matches(ops.norm_calibrate(latents, tau, eps), ref)
    R.assert_matches(ops.latent_step(latents, tau=tau, eps=eps), ref)
    full = torch.full((2, 40), scale, dtype=dtype, device=device)  # the case of the issue
    R.assert_matches(ops.norm_calibrate(full, 1.0, eps), R.calibrate(full, 1.0, eps))


# -- bad input (gathered from tests/test_ops_api.py) ----------------------------------------------

def bad_norm_calibrate_calls():
    D, d = 40, 7
    c = Case(D, d, 3, torch.float32, "cpu")
    h = c.hidden
    return [
        ("tau-shape", lambda: ops.norm_calibrate(h, torch.ones(2)), ValueError, r"tau: expected shape \(3,\)"),
        ("tau-dtype", lambda: ops.norm_calibrate(h, torch.ones(3, dtype=torch.float64)), TypeError, r"tau: expected dtype torch.float32"),
        ("tau-none", lambda: ops.norm_calibrate(h, None), TypeError, r"tau: expected"),
        ("eps", lambda: ops.norm_calibrate(h, 1.0, eps=0), ValueError, r"eps: expected a positive number"),
    ]


@pytest.mark.parametrize("name,call,exc,match", bad_norm_calibrate_calls(), ids=[c[0] for c in bad_norm_calibrate_calls()])
def test_bad_norm_calibrate_input_names_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
