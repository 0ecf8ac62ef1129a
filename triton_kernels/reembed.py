"""out[b] = latents[b] if latent_mask[b] else embed_weight[token_ids[b]]; a text row's id outside [0, V) asserts."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET, mask_bytes, block, rne_bf16, round_bf16


# debug=True compiles the device_assert in (GPU); under the interpreter the ops check CPU tensors first.
@triton.jit(debug=True)
def reembed_kernel(ids_ptr, latents_ptr, mask_ptr, embed_ptr, out_ptr, M, D, V,
                   stride_ids, stride_lm, stride_ld, stride_mask, stride_ev, stride_ed, stride_om, stride_od,
                   ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_M, BLOCK_D) tile; latent rows never touch the table (their ids are placeholders)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < D)[None, :]
    latent = tl.load(mask_ptr + rows * stride_mask, mask=row_ok, other=0) != 0
    ids = tl.load(ids_ptr + rows * stride_ids, mask=row_ok, other=0).to(tl.int64)
    in_table = (ids >= 0) & (ids < V)
    tl.device_assert(in_table | latent, "gapkern reembed: a text row's token id is outside [0, V)")
    z = tl.load(latents_ptr + rows[:, None] * stride_lm + cols[None, :] * stride_ld,
                mask=ok & latent[:, None], other=0.0).to(tl.float32)
    e = tl.load(embed_ptr + ids[:, None] * stride_ev + cols[None, :] * stride_ed,
                mask=ok & (in_table & ~latent)[:, None], other=0.0).to(tl.float32)
    val = tl.where(latent[:, None], z, e)
    if ROUND_BF16:
        val = rne_bf16(val)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od, val, mask=ok)


def tiles(M: int, D: int) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=block(M, 1, 64), BLOCK_D=block(D, 16, 1024))
    return dict(BLOCK_M=block(M, 1, 4), BLOCK_D=block(D, 16, 512), num_warps=4)


def reembed(token_ids, latents, latent_mask, embed_weight, out) -> None:
    (M, D), V = out.shape, embed_weight.shape[0]
    latent_mask = mask_bytes(latent_mask)
    cfg = tiles(M, D)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_D"]))
    reembed_kernel[grid](
        token_ids, latents, latent_mask, embed_weight, out, M, D, V,
        token_ids.stride(0), *latents.stride(), latent_mask.stride(0), *embed_weight.stride(), *out.stride(),
        ROUND_BF16=round_bf16(out), **cfg)
