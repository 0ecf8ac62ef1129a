"""pca_reconstruct: parity with the float64 reference, and the orthonormal basis it requires."""
from __future__ import annotations

import pytest
import torch

from gapkern import ops

import reference as R
from cases import DTYPES, Case, case_for, dtypes, grid, rows, shapes


@grid
@dtypes
@shapes
@rows
@pytest.mark.parametrize("whiten", [False, True], ids=["plain", "whitened"])
def test_pca_reconstruct_matches_reference(backend, dtype, shape, B, whiten):
    c = case_for(backend, shape, B, dtype)
    coeffs = (torch.randn(B, c.d) * 0.5).to(dtype).to(c.device)
    sigma = c.sigma if whiten else None
    out = ops.pca_reconstruct(coeffs, c.basis, c.mean, sigma)
    R.assert_matches(out, R.reconstruct(coeffs, c.basis, c.mean, sigma))


@grid
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_orthonormal_basis_is_rejected(backend, dtype):
    c = case_for(backend, (200, 37), 3, dtype)
    skewed = (R.f64(c.basis) @ (torch.eye(37, dtype=torch.float64) + 0.1)).to(dtype).to(c.device)
    with pytest.raises(ValueError, match=r"basis: expected orthonormal columns"):
        ops.latent_step(c.hidden, c.weight, c.bias, skewed, c.mean, c.tau)
    with pytest.raises(ValueError, match=r"basis: expected orthonormal columns"):
        ops.pca_reconstruct(c.hidden[:, :37], (R.f64(c.basis) * 2).to(dtype).to(c.device), c.mean)


# -- bad input (gathered from tests/test_ops_api.py) ----------------------------------------------

def bad_pca_reconstruct_calls():
    D, d = 40, 7
    c = Case(D, d, 3, torch.float32, "cpu")
    h, U, m = c.hidden, c.basis, c.mean
    return [
        ("coeffs", lambda: ops.pca_reconstruct(h[:, :5], U, m), ValueError, r"coeffs: expected size 7"),
        ("mean", lambda: ops.pca_reconstruct(h[:, :d], U, m[:-1]), ValueError, r"mean: expected size 40"),
        ("sigma", lambda: ops.pca_reconstruct(h[:, :d], U, m, m), ValueError, r"sigma: expected size 7"),
        ("basis-wide", lambda: ops.check_orthonormal(torch.eye(3, 5)), ValueError,
         r"basis: expected at most D = 3 orthonormal columns"),
    ]


@pytest.mark.parametrize("name,call,exc,match", bad_pca_reconstruct_calls(), ids=[c[0] for c in bad_pca_reconstruct_calls()])
def test_bad_pca_reconstruct_input_names_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
