"""reembed: embeds[b] = latents[b] if latent_mask[b] else embed_weight[token_ids[b]].

The public function checks (CPU ids against the table too), then calls the custom op
``gapkern::reembed_out`` (``out`` declared mutated: CUDA-graph safe); its fake impl repeats the
shape checks, so they hold under torch.compile too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as V
from .backend import module_for


def check(token_ids, latents, latent_mask, embed_weight, out):
    """token_ids (B,) int, latents (B, D), latent_mask (B,) bool, embed_weight (V, D), out (B, D) or None."""
    V.tensor("token_ids", token_ids, 1, "(B,)", dtypes=(torch.int64, torch.int32), dtype_names="int64 or int32")
    rows = token_ids.shape[0]
    V.tensor("embed_weight", embed_weight, 2, "(V, D)")
    V.tensor("latents", latents, 2, f"({rows}, D)")
    V.size("latents", latents, 0, rows, "B, the rows of token_ids")
    V.size("latents", latents, 1, embed_weight.shape[1], "D, the width of embed_weight")
    if latent_mask is None:
        raise TypeError(f"latent_mask: expected a bool tensor of shape ({rows},), got None")
    V.mask(latent_mask, rows, token_ids.device)
    V.same_device(token_ids.device, latents=latents, embed_weight=embed_weight)
    V.out_like(out, rows, embed_weight.shape[1], embed_weight.dtype, token_ids.device)


def token_ids_in_range(token_ids, latent_mask, vocab: int):
    """Text rows must name a row of the embedding table; latent rows carry placeholders (any value).

    Checked on the host for CPU tensors only: on a GPU the kernels check on the device, so the
    call stays free of host syncs (CUDA-graph safe); traced code leaves it to the gather's own check.
    """
    if token_ids.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = ((token_ids < 0) | (token_ids >= vocab)) & ~latent_mask
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"token_ids: expected ids in [0, {vocab}) (the rows of embed_weight) on text rows, "
                         f"got {int(token_ids[row])} on row {row}")


def reembed(token_ids, latents, latent_mask, embed_weight, out=None):
    """embeds[b] = latents[b] if latent_mask[b] else embed_weight[token_ids[b]].

    Latent rows' ids are placeholders (any value); a text row's id outside [0, V) is an error:
    a ValueError for CPU tensors, a device-side assert on a GPU (no host sync).
    """
    check(token_ids, latents, latent_mask, embed_weight, out)
    token_ids_in_range(token_ids, latent_mask, embed_weight.shape[0])
    if out is None:
        out = embed_weight.new_empty(token_ids.shape[0], embed_weight.shape[1])
    if token_ids.shape[0]:
        reembed_op(token_ids, latents, latent_mask, embed_weight, out)
    return out


@torch.library.custom_op("gapkern::reembed_out", mutates_args=("out",))
def reembed_op(token_ids: Tensor, latents: Tensor, latent_mask: Tensor, embed_weight: Tensor, out: Tensor) -> None:
    module_for(token_ids.device, embed_weight.dtype).reembed(token_ids, latents, latent_mask, embed_weight, out)


@reembed_op.register_fake
def _(token_ids, latents, latent_mask, embed_weight, out):
    check(token_ids, latents, latent_mask, embed_weight, out)
