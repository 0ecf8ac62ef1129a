"""Triton kernels of the latent step: the triton backend, packaged as ``gapkern.triton_kernels`` (setup.py).

One op per module, read top to bottom: the formula, the @triton.jit kernel, the launcher, and the
op's entry point, named as in :class:`gapkern.ops.backend.Backend`: ``pca_project``
(project.py), ``pca_reconstruct`` (reconstruct.py), ``norm_calibrate`` (calibrate.py),
``ema_update`` (ema.py), ``reembed`` (embed.py), and the latent step, bound once to its tensors and
workspaces, ``prepare_latent_step`` (latent_step.py). Set
``TRITON_INTERPRET=1`` before importing them to run on CPU tensors; ``INTERPRET`` says whether they do.
"""
from ._common import INTERPRET
from .calibrate import norm_calibrate
from .ema import ema_update
from .embed import reembed
from .latent_step import prepare_latent_step
from .project import pca_project
from .reconstruct import pca_reconstruct

__all__ = ["INTERPRET", "pca_project", "pca_reconstruct", "norm_calibrate", "ema_update", "reembed",
           "prepare_latent_step"]
