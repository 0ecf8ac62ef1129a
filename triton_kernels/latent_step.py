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


def bind_latent_step(weight, bias, basis, mean, sigma, tau, eps, latent_mask, out, workspace):
    """``kernel(hidden)`` writing the step of hidden (B, D) into ``out`` (B, D). The split plan and the
    workspaces (``workspace(kind, shape, device)``: a float32 scratch buffer) are taken once, here."""
    if weight is None:
        def identity(hidden):
            calibrate.launch(hidden, out, tau=tau, eps=eps, latent_mask=latent_mask)
        return identity
    (rows, dim), rank = out.shape, weight.shape[1]
    splits, k_per_split, cfg = project.split_plan(rows, rank, dim, out.device)
    partials = workspace("triton.partials", (splits, rows, rank), out.device)
    latents = None if tau is None else workspace("triton.latents", (rows, dim), out.device)

    def kernel(hidden):
        project.launch(hidden, weight, bias, partials, splits, k_per_split, cfg)
        if latents is None:
            reconstruct.launch(partials, basis, mean, sigma, out, latent_mask=latent_mask)
            return
        reconstruct.launch(partials, basis, mean, sigma, latents, latent_mask=latent_mask)
        calibrate.launch(latents, out, tau=tau, eps=eps, latent_mask=latent_mask)
    return kernel
