"""latents = mean + (coeffs * sigma) @ basis.T, row by row; the split-K partial sums of coeffs are added here."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, arg, block, mask_bytes, rne_bf16, round_bf16, stride0


@triton.jit
def reconstruct_kernel(c_ptr, basis_ptr, mean_ptr, sigma_ptr, mask_ptr, out_ptr,
                       M, N, D, SPLITS,
                       stride_cs, stride_cm, stride_cn, stride_bd, stride_bn, stride_mean, stride_sigma,
                       stride_mask, stride_om, stride_od,
                       HAS_MEAN: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_MASK: tl.constexpr,
                       ROUND_BF16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (BLOCK_M, BLOCK_D) tile of latents; rows outside ``mask`` are neither read nor written."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows * stride_mask, mask=row_ok, other=0) != 0)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        c_ptrs = c_ptr + rows[:, None] * stride_cm + ns[None, :] * stride_cn
        c_ok = row_ok[:, None] & n_ok[None, :]
        c = tl.load(c_ptrs, mask=c_ok, other=0.0).to(tl.float32)
        for s in range(1, SPLITS):  # the split-K partial sums
            c += tl.load(c_ptrs + s * stride_cs, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_SIGMA:
            c *= tl.load(sigma_ptr + ns * stride_sigma, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        u = tl.load(basis_ptr + ns[:, None] * stride_bn + cols[None, :] * stride_bd,
                    mask=n_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(c, u.to(tl.float32), acc, input_precision="ieee")  # float32 coefficients, no TF32
    if HAS_MEAN:
        acc += tl.load(mean_ptr + cols * stride_mean, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_BF16:
        acc = rne_bf16(acc)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od, acc,
             mask=row_ok[:, None] & col_ok[None, :])


def tiles(M: int, N: int, D: int) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=block(M, 16, 64), BLOCK_D=block(D, 16, 512), BLOCK_N=block(N, 16, 256))
    # BLOCK_D = 32: at B=1 and D=3584, 112 programs stream the basis.
    return dict(BLOCK_M=block(M, 16, 32), BLOCK_D=32, BLOCK_N=64, num_warps=4, num_stages=3)


def launch(partials, basis, mean, sigma, out, *, latent_mask=None):
    """Write the latents of ``partials`` ((splits, B, d) or (B, d) coefficients) into ``out`` (B, D)
    (any float dtype: a float32 buffer when a calibration follows); rows where ``latent_mask`` is
    false are left untouched."""
    latent_mask = mask_bytes(latent_mask)
    if partials.dim() == 2:
        partials = partials.unsqueeze(0)
    splits, M, N = partials.shape
    D = basis.shape[0]
    cfg = tiles(M, N, D)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_D"]))
    reconstruct_kernel[grid](
        partials, basis, arg(mean, out), arg(sigma, out), arg(latent_mask, out), out, M, N, D, splits,
        *partials.stride(), *basis.stride(), stride0(mean), stride0(sigma), stride0(latent_mask), *out.stride(),
        HAS_MEAN=mean is not None, HAS_SIGMA=sigma is not None, HAS_MASK=latent_mask is not None,
        ROUND_BF16=round_bf16(out), **cfg)


def reconstruct(coeffs, basis, mean, sigma) -> torch.Tensor:
    """latents (B, D) in basis's dtype."""
    out = basis.new_empty(coeffs.shape[0], basis.shape[0])
    launch(coeffs, basis, mean, sigma, out)
    return out
