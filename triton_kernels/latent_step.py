"""latents = calibrate(mean + ((hidden @ weight + bias) * sigma) @ basis.T), written into the masked rows of out.

With a head: the split-K projection into a float32 workspace, then the reconstruction that
reduces the partial sums. Calibrated, the reconstruction writes float32 latents to a second
workspace and the calibration reads them back: the norm is taken from the latents themselves,
so it is exact for any basis and depends on nothing computed in an earlier call. Uncalibrated,
the reconstruction writes ``out`` directly. Without a head (weight None): one launch that copies
or calibrates hidden. Given its workspaces, nothing is allocated and nothing waits on the host,
so a CUDA graph can capture it.
"""
from __future__ import annotations

import torch

from gapkern.ops import _cache

from . import calibrate, project, reconstruct

ALIGN = 16  # elements: a 16-divisible row stride and rank is what Triton specializes into 16-byte loads


def _padded(t, rank):
    """``t`` ((D, d) or (d,)) in a zeroed buffer of ``rank`` >= d columns: aligned rows, zero extra columns."""
    if t is None:
        return None
    out = t.new_zeros(*t.shape[:-1], rank)
    out[..., :t.shape[-1]] = t
    return out


def packed_head(weight, bias, basis, sigma):
    """(weight, bias, basis, sigma) with the rank padded to a multiple of ALIGN (zeros), kept while the
    sources are unmodified (gapkern/ops/_cache.py): the padded coefficients are 0 and add 0 to the latents."""
    rank = -(-weight.shape[1] // ALIGN) * ALIGN
    return _cache.derived("triton.head", lambda: tuple(_padded(t, rank) for t in (weight, bias, basis, sigma)),
                          weight, bias, basis, sigma)


def prepare_latent_step(weight, bias, basis, mean, tau, sigma, eps, latent_mask, out, workspace):
    """``kernel(hidden)`` writing the step of hidden (B, D) into ``out`` (B, D). The split plan and the
    workspaces (``workspace(kind, shape, device)``: a float32 scratch buffer) are taken once, here."""
    if weight is None:
        def identity(hidden):
            calibrate.launch(hidden, out, tau=tau, eps=eps, latent_mask=latent_mask)
        return identity
    (rows, dim), rank = out.shape, packed_head(weight, bias, basis, sigma)[0].shape[1]
    splits, k_per_split, cfg = project.split_plan(rows, rank, dim, out.device)
    partials = workspace("triton.partials", (splits, rows, rank), out.device)
    latents = None if tau is None else workspace("triton.latents", (rows, dim), out.device)

    def kernel(hidden):
        w, b, u, s = packed_head(weight, bias, basis, sigma)  # repacked only after an in-place edit
        project.launch(hidden, w, b, partials, splits, k_per_split, cfg)
        if latents is None:
            reconstruct.launch(partials, u, mean, s, out, latent_mask=latent_mask)
            return
        reconstruct.launch(partials, u, mean, s, latents, latent_mask=latent_mask)
        calibrate.launch(latents, out, tau=tau, eps=eps, latent_mask=latent_mask)
    return kernel
