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

from . import calibrate, project, reconstruct


def latent_step(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out, workspace) -> None:
    """``workspace(kind, shape, device)`` returns a float32 scratch buffer (kept between calls by the caller)."""
    if weight is None:
        calibrate.launch(hidden, out, tau=tau, eps=eps, latent_mask=latent_mask)
        return
    (rows, dim), rank = hidden.shape, weight.shape[1]
    splits, k_per_split, cfg = project.split_plan(rows, rank, dim, hidden.device)
    partials = workspace("triton.partials", (splits, rows, rank), hidden.device)
    project.launch(hidden, weight, bias, partials, splits, k_per_split, cfg)
    if tau is None:
        reconstruct.launch(partials, basis, mean, sigma, out, latent_mask=latent_mask)
        return
    latents = workspace("triton.latents", (rows, dim), hidden.device)
    reconstruct.launch(partials, basis, mean, sigma, latents, latent_mask=latent_mask)
    calibrate.launch(latents, out, tau=tau, eps=eps, latent_mask=latent_mask)
