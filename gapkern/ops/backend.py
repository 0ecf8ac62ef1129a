"""The backends: what each must provide (:class:`Backend`), and which one runs an op.

A backend is a module with the functions of :class:`Backend`, each in the op's own argument order
(the public function's, without the checks): ``gapkern.ops._torch`` (the float32 reference),
``gapkern.triton_kernels`` (the package ``triton_kernels/``) and ``gapkern.ops._cuda`` (the
extension ``gapkern._C``). tests/ops/test_backend_protocol.py holds each against it.

The one chosen is resolved once per selection and device type. Whether a backend can run on a
device type is a :class:`Status` (data: a :class:`State` and the reason); ``backend_info()`` puts
it in words for users. Loading a backend catches ``ImportError`` only (an unbuilt extension, a
missing triton) and keeps it, chained to the error an explicit selection raises; any other
exception while importing a backend is a bug and propagates.
"""
from __future__ import annotations

import contextlib
import enum
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

NAMES = ("auto", "cuda", "triton", "torch")


@runtime_checkable
class Backend(Protocol):
    """The functions every backend module provides. Arguments arrive checked (each op's file in
    gapkern/ops/ checks them): B > 0, any strides, ``tau`` a float32 (B,) tensor (maybe a stride-0
    broadcast of one value), ``out`` given where it is a parameter."""

    def pca_project(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """coeffs (B, d) = hidden @ weight + bias, in hidden's dtype."""

    def pca_reconstruct(self, coeffs: Tensor, basis: Tensor, mean: Optional[Tensor],
                        sigma: Optional[Tensor]) -> Tensor:
        """latents (B, D) = mean + (coeffs * sigma) @ basis.T, in basis's dtype."""

    def norm_calibrate(self, latents: Tensor, tau: Tensor, eps: float) -> Tensor:
        """latents * tau / max(||latents||, eps) per row; rows with tau <= 0 unchanged."""

    def ema_update(self, tau_state: Tensor, observed: Tensor, decay: float) -> None:
        """tau_state (1,) <- decay * tau_state + (1 - decay) * mean(observed), in place (0/NaN: set)."""

    def reembed(self, token_ids: Tensor, latents: Tensor, latent_mask: Tensor, embed_weight: Tensor,
                out: Tensor) -> None:
        """out[b] = latents[b] if latent_mask[b] else embed_weight[token_ids[b]]."""

    def prepare_latent_step(self, weight: Optional[Tensor], bias: Optional[Tensor], basis: Optional[Tensor],
                            mean: Optional[Tensor], tau: Optional[Tensor], sigma: Optional[Tensor], eps: float,
                            latent_mask: Optional[Tensor], out: Tensor,
                            workspace: Callable[..., Tensor]) -> Callable[[Tensor], None]:
        """``kernel(hidden)``: writes the latent step of hidden (B, D) into the masked rows of ``out``.

        What can be prepared once is prepared here; ``workspace(kind, shape, device,
        dtype=torch.float32, zeroed=False)`` gives the scratch buffers gapkern/ops/_cache.py keeps."""


OPS = ("pca_project", "pca_reconstruct", "norm_calibrate", "ema_update", "reembed", "prepare_latent_step")


def protocol_mismatches(module) -> list[str]:
    """What ``module`` lacks of :class:`Backend` or names differently, in words ([] when it conforms):
    each function must take the protocol's parameter names in the protocol's order."""
    found = []
    for name in OPS:
        fn = getattr(module, name, None)
        if not callable(fn):
            found.append(f"{name}: missing")
            continue
        want = [p for p in inspect.signature(getattr(Backend, name)).parameters if p != "self"]
        got = list(inspect.signature(fn).parameters)
        if got != want:
            found.append(f"{name}: parameters ({', '.join(got)}), the protocol's are ({', '.join(want)})")
    return found


def _import_torch():
    from . import _torch
    return _torch


def _import_triton():
    from .. import triton_kernels  # the folder triton_kernels/, packaged as gapkern.triton_kernels (setup.py)
    return triton_kernels


def _import_cuda():
    from . import _cuda
    return _cuda


IMPORTS = {"torch": _import_torch, "triton": _import_triton, "cuda": _import_cuda}
_selected = os.environ.get("GAPKERN_BACKEND", "auto")
_loaded: dict = {}  # name -> the module, or the ImportError that stopped it
_resolved: dict = {}  # (selection, device type, float64) -> module: the per-call lookup is one dict hit


class State(enum.Enum):
    READY = "ready"
    NOT_BUILT = "not built"  # the cuda extension gapkern._C did not import
    NOT_INSTALLED = "not installed"  # triton did not import
    NO_GPU = "no GPU"
    NEEDS_CUDA = "needs CUDA tensors"


@dataclass(frozen=True)
class Status:
    """Whether a backend can run ops on tensors of one device type, and why not."""

    state: State
    reason: str = ""  # more words on the state, "" when there are none
    error: ImportError | None = None  # what stopped the import (NOT_BUILT, NOT_INSTALLED)

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def __str__(self) -> str:
        if not self.reason:
            return self.state.value
        return f"{self.state.value}: {self.reason}" if self.error else f"{self.state.value} ({self.reason})"


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {', '.join(NAMES)}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every later op call (``auto``, ``cuda``, ``triton``, ``torch``)."""
    global _selected
    _selected = _check_name(name)


def get_backend() -> str:
    return _check_name(_selected)


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend(name):`` selects ``name`` inside the block; the previous selection comes
    back on exit, also when the block raises."""
    global _selected
    before = _selected
    set_backend(name)
    try:
        yield
    finally:
        _selected = before


def _load(name):
    """The backend's module, imported once, or the ImportError that stopped it."""
    if name not in _loaded:
        try:
            module = IMPORTS[name]()
        except ImportError as exc:
            _loaded[name] = exc
            return exc
        wrong = protocol_mismatches(module)
        if wrong:  # a bug in the backend, never "not installed"
            raise TypeError(f"gapkern backend {name!r} ({module.__name__}) does not follow "
                            "gapkern.ops.backend.Backend: "
                            + "; ".join(wrong))
        _loaded[name] = module
    return _loaded[name]


def name_of(module) -> str:
    """The backend name of a loaded backend module."""
    return next(name for name, loaded in _loaded.items() if loaded is module)


def backend_status(name: str, device=None) -> Status:
    """Whether backend ``name`` (``cuda``, ``triton``, ``torch``) can run on tensors of ``device``
    (default: this machine's GPU if it has one, else its CPU)."""
    if _check_name(name) == "auto":
        raise ValueError("backend: expected cuda, triton or torch (auto is a choice among them), got 'auto'")
    device_type = _machine_device() if device is None else torch.device(device).type
    if name == "torch":
        return Status(State.READY)
    module = _load(name)
    if isinstance(module, ImportError):
        state = State.NOT_BUILT if name == "cuda" else State.NOT_INSTALLED
        return Status(state, f"{type(module).__name__}: {module}", module)
    if device_type == "cuda":
        return Status(State.READY) if torch.cuda.is_available() else Status(State.NO_GPU)
    if name == "triton" and module.INTERPRET:
        return Status(State.READY, "interpreter, CPU tensors")
    if not torch.cuda.is_available():
        hint = "set TRITON_INTERPRET=1 before import to run on CPU tensors" if name == "triton" else ""
        return Status(State.NO_GPU, hint)
    return Status(State.NEEDS_CUDA, f"got {device_type} tensors")


def _machine_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_info() -> dict:
    """Backend name -> ``ready`` or why it cannot run on this machine's device, in words."""
    return {name: str(backend_status(name)) for name in ("cuda", "triton", "torch")}


def module_for(device: torch.device, dtype: torch.dtype = torch.float32):
    """The backend module that runs ops on ``device`` under the current selection."""
    key = (_selected, device.type, dtype == torch.float64)
    module = _resolved.get(key)
    if module is None:
        module = _resolved[key] = _resolve(get_backend(), device.type, dtype == torch.float64)
    return module


def _resolve(name, device_type, float64):
    if float64:
        if name not in ("auto", "torch"):
            raise TypeError(f"gapkern backend {name!r} supports float32, bfloat16 and float16; "
                            "float64 runs on the torch backend only")
        return _load("torch")
    if name == "auto":
        return _auto(device_type)
    status = backend_status(name, device_type)
    if not status.ready:
        raise RuntimeError(f"gapkern backend {name!r} cannot run on {device_type} tensors: {status}") from status.error
    return _load(name)


def _auto(device_type):
    """cuda, else triton on a GPU; else the torch reference (with a warning on CUDA tensors)."""
    if device_type != "cuda":
        return _load("torch")
    why = {}
    for name in ("cuda", "triton"):
        status = backend_status(name, device_type)
        if status.ready:
            return _load(name)
        why[name] = str(status)
    warnings.warn("gapkern: no GPU backend can run here (" + "; ".join(f"{k}: {v}" for k, v in why.items())
                  + "): the ops run on the torch reference", RuntimeWarning, stacklevel=5)
    return _load("torch")
