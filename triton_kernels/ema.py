"""tau <- decay * tau + (1 - decay) * mean(observed), or mean(observed) while tau is not > 0 (0 or NaN)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET, block


@triton.jit
def ema_kernel(tau_ptr, obs_ptr, N, stride_obs, decay, one_minus_decay, BLOCK: tl.constexpr):
    """One program: the mean of the observations, then the in-place update (no host sync)."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        ns = n0 + tl.arange(0, BLOCK)
        total += tl.load(obs_ptr + ns * stride_obs, mask=ns < N, other=0.0).to(tl.float32)
    m = tl.sum(total, axis=0) / N
    tau = tl.load(tau_ptr)
    tl.store(tau_ptr, tl.where(tau > 0, decay * tau + one_minus_decay * m, m))


def ema_update(tau_state, observed, decay: float) -> None:
    n = observed.shape[0]
    size = block(n, 16, 4096 if INTERPRET else 1024)
    ema_kernel[(1,)](tau_state, observed, n, observed.stride(0), decay, 1.0 - decay, BLOCK=size)
