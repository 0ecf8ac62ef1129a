"""ema_update: the running target (SPEC section 2, calibration targets) on every backend."""
from __future__ import annotations

import pytest
import torch

from gapkern import ops

from cases import BACKENDS, device_for


grid = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


@grid
def test_ema_update_follows_the_running_mean(backend):
    device = device_for(backend)
    state = torch.zeros(1, device=device)
    first = torch.tensor([2.0, 4.0], device=device)
    assert ops.ema_update(state, first, decay=0.9) is state
    assert state.item() == pytest.approx(3.0), "the first observation initialises the target"
    ops.ema_update(state, torch.tensor([13.0], device=device), decay=0.9)
    assert state.item() == pytest.approx(0.9 * 3.0 + 0.1 * 13.0, rel=1e-6)
    ops.ema_update(state, torch.empty(0, device=device), decay=0.9)
    assert state.item() == pytest.approx(4.0, rel=1e-6), "an empty observation changes nothing"
    nan_state = torch.full((1,), float("nan"), device=device)
    ops.ema_update(nan_state, torch.tensor([5.0], dtype=torch.bfloat16, device=device), decay=0.5)
    assert nan_state.item() == pytest.approx(5.0)


# -- bad input (gathered from tests/test_ops_api.py) ----------------------------------------------

def bad_ema_update_calls():
    return [
        ("ema-state", lambda: ops.ema_update(torch.zeros(2), torch.ones(3)), ValueError, r"tau_state: expected size 1"),
        ("ema-decay", lambda: ops.ema_update(torch.zeros(1), torch.ones(3), decay=1.5), ValueError, r"decay: expected a number in \[0, 1\)"),
    ]


@pytest.mark.parametrize("name,call,exc,match", bad_ema_update_calls(), ids=[c[0] for c in bad_ema_update_calls()])
def test_bad_ema_update_input_names_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
