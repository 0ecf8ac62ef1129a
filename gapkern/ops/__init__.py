"""The latent-step ops (SPEC section 2). One file per op, the backend chosen at call time.

Each op's file holds its public function, its checks, its ``torch.library`` custom op with the
fake impl (which repeats the checks, so they hold under torch.compile) and its autograd:

| op | file | custom op |
| --- | --- | --- |
| ``pca_project`` | project.py | ``gapkern::pca_project`` (differentiable) |
| ``pca_reconstruct`` | reconstruct.py | ``gapkern::pca_reconstruct`` |
| ``norm_calibrate`` | calibrate.py | ``gapkern::norm_calibrate`` |
| ``ema_update`` | ema.py | ``gapkern::ema_update`` |
| ``reembed`` | embed.py | ``gapkern::reembed_out`` |
| ``latent_step``, ``bind_latent_step`` | step.py | ``gapkern::latent_step`` (differentiable), ``::latent_step_out`` |

The public functions always go through their custom op; a decode loop binds the latent step once
instead (:func:`bind_latent_step`, step.py says why). The backends (backend.py: the protocol and
the registry) are ``_torch.py`` (the reference), ``gapkern.triton_kernels`` and ``_cuda.py``;
``_validate.py`` holds the checks the ops share, ``_cache.py`` the kept workspaces.
"""
from __future__ import annotations

from ._cache import clear_caches
from ._validate import check_orthonormal
from .backend import (Backend, State, Status, backend_info, backend_status, get_backend, module_for, set_backend,
                      use_backend)
from .calibrate import norm_calibrate
from .ema import ema_update
from .embed import reembed
from .project import pca_project
from .reconstruct import pca_reconstruct
from .step import LatentStep, bind_latent_step, latent_step

__all__ = [
    "pca_project", "pca_reconstruct", "norm_calibrate", "ema_update", "reembed", "latent_step",
    "bind_latent_step", "LatentStep",
    "set_backend", "get_backend", "use_backend", "backend_info", "backend_status", "module_for", "State", "Status",
    "Backend",
    "check_orthonormal", "clear_caches",
]
