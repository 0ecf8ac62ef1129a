"""coeffs = hidden @ weight + bias: a strided (M, K) x (K, N) matmul accumulated in float32, optionally split over K."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, arg, block, dot_f32, num_sms, rne_bf16, round_bf16, stride0


@triton.jit
def project_kernel(h_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, K_PER_SPLIT,
                   stride_hm, stride_hk, stride_wk, stride_wn, stride_bias,
                   stride_os, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, ROUND_BF16: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile (program_id 0, 1) of split program_id(2): rows K_PER_SPLIT * s ... of the reduction, into out[s]."""
    pid_s = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        ks = pid_s * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        # Added once, by the first split. A branch, not the mask `col_ok & (pid_s == 0)`: triton
        # 3.9's interpreter splats that scalar comparison to an int32 mask and rejects it.
        if pid_s == 0:
            bias = tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    if ROUND_BF16:
        acc = rne_bf16(acc)
    out = out_ptr + pid_s * stride_os + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def tiles(M: int, N: int, K: int) -> dict:
    """Block sizes: big tiles under the interpreter (few numpy calls), GPU-sized otherwise."""
    if INTERPRET:
        return dict(BLOCK_M=block(M, 16, 256), BLOCK_N=block(N, 16, 256), BLOCK_K=block(K, 16, 512))
    return dict(BLOCK_M=block(M, 16, 64), BLOCK_N=64, BLOCK_K=block(K, 16, 64), num_warps=4, num_stages=3)


def split_plan(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, dict]:
    """(splits, K_PER_SPLIT, tiles) so that a small-M projection still runs enough programs.

    Splitting K fills the GPU at B=1 (one weight tile per program); every
    reconstruction program re-reads all partial sums of its rows, so the
    split count shrinks as M grows.
    """
    cfg = tiles(M, N, K)
    grid_mn = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    sms = 16 if INTERPRET else num_sms(device)  # a stand-in on CPU, so split-K runs there too
    # Cap: a reconstruction program reads splits * rows * 4 bytes of partials per
    # coefficient, about what it reads of the basis (BLOCK_D * 2 bytes).
    wanted = min(triton.cdiv(2 * sms, grid_mn), max(1, 16 // min(M, cfg["BLOCK_M"])), k_tiles)
    per_split = triton.cdiv(k_tiles, max(1, wanted))
    return triton.cdiv(k_tiles, per_split), per_split * cfg["BLOCK_K"], cfg


def launch(hidden, weight, bias, out, splits=1, k_per_split=None, cfg=None):
    """out[s] = hidden[:, Ks] @ weight[Ks, :] (+ bias on s = 0). ``out`` is (M, N) or a (splits, M, N) workspace."""
    (M, K), N = hidden.shape, weight.shape[1]
    cfg = cfg or tiles(M, N, K)
    k_per_split = k_per_split or triton.cdiv(K, cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    s_os, s_om, s_on = out.stride() if out.dim() == 3 else (0, *out.stride())
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), splits)
    project_kernel[grid](
        hidden, weight, arg(bias, out), out, M, N, K, k_per_split,
        *hidden.stride(), *weight.stride(), stride0(bias), s_os, s_om, s_on,
        HAS_BIAS=bias is not None, DOT_F32=dot_f32(hidden, weight), ROUND_BF16=round_bf16(out), **cfg)


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """coeffs (B, d) in hidden's dtype; any strides (the autograd backward passes transposed views)."""
    out = hidden.new_empty(hidden.shape[0], weight.shape[1])
    launch(hidden, weight, bias, out)
    return out
