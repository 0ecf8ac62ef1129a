"""ema_update: tau <- decay * tau + (1 - decay) * mean(observed); the first observation initialises it.

The public function checks, then calls the custom op ``gapkern::ema_update`` (``tau_state``
declared mutated); its fake impl repeats the checks, so they hold under torch.compile too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as V
from .backend import module_for


def check(tau_state, observed, decay):
    """tau_state a float32 (1,) tensor, observed (N,) on its device, decay in [0, 1)."""
    V.tensor("tau_state", tau_state, 1, "(1,)", dtypes=(torch.float32,), dtype_names="torch.float32")
    V.size("tau_state", tau_state, 0, 1, "one running target")
    V.tensor("observed", observed, 1, "(N,) of norms")
    V.same_device(tau_state.device, observed=observed)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")


def ema_update(tau_state, observed, decay=0.99):
    """tau <- decay * tau + (1 - decay) * mean(observed); the first observation initialises it.

    ``tau_state`` is a float32 (1,) tensor, 0 (or NaN) until something was
    observed; it is updated in place and returned. No host sync.
    """
    check(tau_state, observed, decay)
    if observed.shape[0]:
        ema_op(tau_state, observed, float(decay))
    return tau_state


@torch.library.custom_op("gapkern::ema_update", mutates_args=("tau_state",))
def ema_op(tau_state: Tensor, observed: Tensor, decay: float) -> None:
    module_for(tau_state.device, observed.dtype).ema_update(tau_state, observed, decay)


@ema_op.register_fake
def _(tau_state, observed, decay):
    check(tau_state, observed, decay)
