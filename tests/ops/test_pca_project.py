"""pca_project: parity with the float64 reference (every backend, dtype, awkward shape) and its gradients."""
from __future__ import annotations

import pytest
import torch

from gapkern import ops

import reference as R
from cases import Case, case_for, dtypes, grid, rows, shapes


@grid
@dtypes
@shapes
@rows
def test_pca_project_matches_reference(backend, dtype, shape, B):
    c = case_for(backend, shape, B, dtype)
    R.assert_matches(ops.pca_project(c.hidden, c.weight, c.bias), R.project(c.hidden, c.weight, c.bias))


D, d = 40, 7


def small(B=3, dtype=torch.float32):
    return Case(D, d, B, dtype, "cpu")


def test_pca_project_gradcheck_float64():
    c = small(dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (c.hidden, c.weight, c.bias)]
    assert torch.autograd.gradcheck(lambda h, w, b: ops.pca_project(h, w, b), args)


# -- bad input (gathered from tests/test_ops_api.py) ----------------------------------------------

def bad_pca_project_calls():
    D, d = 40, 7
    c = Case(D, d, 3, torch.float32, "cpu")
    h, w, b = c.hidden, c.weight, c.bias
    return [
        ("rank", lambda: ops.pca_project(h[0], w, b), ValueError, r"hidden: expected a 2-D tensor"),
        ("width", lambda: ops.pca_project(h[:, :-1], w, b), ValueError, r"weight: expected size 39"),
        ("bias", lambda: ops.pca_project(h, w, b[:-1]), ValueError, r"bias: expected size 7"),
        ("dtype", lambda: ops.pca_project(h, w.half(), b), TypeError, r"weight: expected dtype torch.float32"),
        ("int", lambda: ops.pca_project(h.long(), w, b), TypeError, r"hidden: expected dtype"),
        ("not-tensor", lambda: ops.pca_project([[1.0]], w, b), TypeError, r"hidden: expected a torch.Tensor"),
    ]


@pytest.mark.parametrize("name,call,exc,match", bad_pca_project_calls(), ids=[c[0] for c in bad_pca_project_calls()])
def test_bad_pca_project_input_names_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
