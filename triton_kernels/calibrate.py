"""out = x * tau / max(||x||_2, eps) row by row (rows with tau <= 0 copied as they are; no tau: a copy)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, arg, block, calibration_scale, mask_bytes, norm_chunk, rne_bf16, round_bf16, stride0


@triton.jit
def calibrate_kernel(x_ptr, tau_ptr, mask_ptr, out_ptr, M, D, eps,
                     stride_xm, stride_xd, stride_tau, stride_mask, stride_om, stride_od,
                     HAS_TAU: tl.constexpr, HAS_MASK: tl.constexpr, ROUND_BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_M rows: a pass for the norms, a pass to scale and store (rows outside ``mask`` untouched)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows * stride_mask, mask=row_ok, other=0) != 0)
    x_rows = x_ptr + rows[:, None] * stride_xm
    scale = tl.full((BLOCK_M,), 1.0, tl.float32)
    if HAS_TAU:
        m = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)
            m, s = norm_chunk(x.to(tl.float32), m, s)
        tau = tl.load(tau_ptr + rows * stride_tau, mask=row_ok, other=0.0)
        scale = calibration_scale(m, s, tau, eps)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        z = tl.load(x_rows + cols[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32) * scale[:, None]
        if ROUND_BF16:
            z = rne_bf16(z)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od, z, mask=ok)


def tiles(M: int, D: int) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=block(M, 1, 64), BLOCK_D=block(D, 16, 1024))
    return dict(BLOCK_M=block(M, 1, 4), BLOCK_D=block(D, 16, 1024), num_warps=4)


def launch(x, out, *, tau=None, eps=1e-6, latent_mask=None):
    """Write x (calibrated when ``tau`` is given) into the rows of ``out`` selected by ``latent_mask``."""
    M, D = x.shape
    latent_mask = mask_bytes(latent_mask)
    cfg = tiles(M, D)
    calibrate_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x, arg(tau, out), arg(latent_mask, out), out, M, D, eps,
        *x.stride(), stride0(tau), stride0(latent_mask), *out.stride(),
        HAS_TAU=tau is not None, HAS_MASK=latent_mask is not None, ROUND_BF16=round_bf16(out), **cfg)


def calibrate(latents: torch.Tensor, tau: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(latents.shape, dtype=latents.dtype, device=latents.device)
    launch(latents, out, tau=tau, eps=eps)
    return out
