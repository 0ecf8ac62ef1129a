"""Shared pieces of the Triton kernels: interpreter detection, dtype flags, block choices."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def rne_bf16(x):
    """Round float32 to the nearest-even bfloat16 value, kept in float32.

    The interpreter's float32 -> bfloat16 cast truncates; storing an exactly
    representable value makes that cast exact. GPUs round correctly already.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


# Whether these kernels run on the interpreter: Triton decided it (from TRITON_INTERPRET) when the
# first @triton.jit above ran. gapkern reads the environment nowhere else; everything asks here.
INTERPRET = isinstance(rne_bf16, InterpretedFunction)


def round_bf16(out: torch.Tensor) -> bool:
    """Whether a kernel storing float32 values into ``out`` must round them itself."""
    return INTERPRET and out.dtype == torch.bfloat16


@triton.jit
def store_f32(ptrs, x, mask, ROUND_BF16: tl.constexpr):
    """tl.store of the float32 values ``x``, rounded to bfloat16 here first when ROUND_BF16 (round_bf16)."""
    if ROUND_BF16:
        x = rne_bf16(x)
    tl.store(ptrs, x, mask=mask)


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


def row_tiles(M: int, D: int, gpu_block_d: int) -> dict:
    """Tiles of a row-wise kernel, (BLOCK_M rows, BLOCK_D columns): few large blocks under the
    interpreter (few numpy calls), a few rows per program on a GPU."""
    if INTERPRET:
        return dict(BLOCK_M=block(M, 1, 64), BLOCK_D=block(D, 16, 1024))
    return dict(BLOCK_M=block(M, 1, 4), BLOCK_D=block(D, 16, gpu_block_d), num_warps=4)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant under the interpreter); torch keeps
    the device properties, so nothing is cached here."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


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
