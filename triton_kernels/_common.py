"""Shared pieces of the Triton kernels: interpreter detection, dtype flags, block choices."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, like Triton itself: the interpreter is chosen when @triton.jit runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def rne_bf16(x):
    """Round float32 to the nearest-even bfloat16 value, kept in float32.

    The interpreter's float32 -> bfloat16 cast truncates; storing an exactly
    representable value makes that cast exact. GPUs round correctly already.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def round_bf16(out: torch.Tensor) -> bool:
    """Whether a kernel storing float32 values into ``out`` must round them itself."""
    return INTERPRET and out.dtype == torch.bfloat16


def dot_f32(*tensors) -> bool:
    """Whether ``tl.dot`` must run on float32 operands with ``input_precision="ieee"``.

    Always under the interpreter (its bfloat16 dot is wrong); on a GPU for
    float32 storage (no TF32). Half-precision operands go to the tensor cores
    as they are: their products are exact in the float32 accumulator.
    """
    return INTERPRET or any(t.dtype == torch.float32 for t in tensors)


def arg(t, stand_in):
    """An optional tensor argument: ``stand_in`` takes the place of None (its HAS_ flag is off, never read)."""
    return stand_in if t is None else t


def mask_bytes(mask):
    """A bool mask as uint8 (a view, no copy): every backend loads bytes, not all load i1."""
    return None if mask is None else mask.view(torch.uint8)


def stride0(t) -> int:
    return 0 if t is None else t.stride(0)


def block(n: int, lo: int, hi: int) -> int:
    """The power of two covering ``n``, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant under the interpreter)."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


@triton.jit
def norm_chunk(x, m, s):
    """Fold the (BLOCK_M, BLOCK) float32 block ``x`` into each row's running (m, s), ||row|| = m sqrt(s).

    m is the largest |x_i| so far, s the sum of (x_i / m)^2 (LAPACK's nrm2 scaling): squares of
    entries near the float32 limits neither overflow nor underflow. A NaN makes s NaN.
    """
    new_m = tl.maximum(m, tl.max(tl.abs(x), axis=1))
    safe = tl.where(new_m > 0, new_m, 1.0)
    r = x / safe[:, None]
    ratio = m / safe
    return new_m, s * ratio * ratio + tl.sum(r * r, axis=1)


@triton.jit
def calibration_scale(m, s, tau, eps):
    """tau / max(||x||, eps) where tau > 0, else 1, for ||x|| = m sqrt(s).

    Divided as (tau / m) / sqrt(s): the norm itself may exceed the largest float32.
    """
    root = tl.sqrt_rn(s)  # >= 1 once m > 0: the largest entry adds exactly 1 to s
    small = m < eps / tl.maximum(root, 1.0)  # ||x|| < eps, without forming ||x||
    big = tl.div_rn(tl.div_rn(tau, tl.where(small, 1.0, m)), tl.where(small, 1.0, root))
    scale = tl.where(small, tl.div_rn(tau, eps), big)
    return tl.where(tau > 0, scale, 1.0)
