"""Backend registry: which implementation runs an op, chosen at call time."""
from __future__ import annotations

import importlib
import os

import torch

NAMES = ("auto", "cuda", "triton", "torch")
_MODULES = {"torch": "gapkern.ops._torch", "triton": "gapkern.ops._triton", "cuda": "gapkern.ops._cuda"}
_selected = os.environ.get("GAPKERN_BACKEND", "auto")
_loaded: dict = {}


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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name):
    """Import a backend module once; return (module, None) or (None, reason)."""
    if name not in _loaded:
        try:
            _loaded[name] = (importlib.import_module(_MODULES[name]), None)
        except Exception as exc:  # an unbuilt extension or a missing triton
            _loaded[name] = (None, f"{type(exc).__name__}: {exc}")
    return _loaded[name]


def _status(name, device_type):
    """'ready' when ``name`` can run on tensors of ``device_type``, else why not."""
    if name == "torch":
        return "ready"
    module, err = _load(name)
    if module is None:
        return ("not built: " if name == "cuda" else "not installed: ") + err
    if device_type == "cuda":
        return "ready" if torch.cuda.is_available() else "no GPU"
    if name == "triton" and interpreting():
        return "ready (interpreter, CPU tensors)"
    return "no GPU" if not torch.cuda.is_available() else f"needs CUDA tensors, not {device_type}"


def backend_info() -> dict:
    """Backend name -> ``ready`` or why it cannot run here."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    info = {}
    for name in ("cuda", "triton", "torch"):
        status = _status(name, device_type)
        if device_type == "cpu" and name == "triton" and status == "no GPU":
            status = "no GPU (set TRITON_INTERPRET=1 before import to run on CPU tensors)"
        info[name] = status
    return info


def module_for(device: torch.device, dtype: torch.dtype = torch.float32):
    """The backend module that runs ops on ``device`` under the current selection."""
    name = get_backend()
    if dtype == torch.float64:
        if name not in ("auto", "torch"):
            raise TypeError(f"gapkern backend {name!r} supports float32, bfloat16 and float16; "
                            "float64 runs on the torch backend only")
        return _load("torch")[0]
    if name == "auto":
        for cand in ("cuda", "triton") if device.type == "cuda" else ():
            if _status(cand, device.type) == "ready":
                return _load(cand)[0]
        return _load("torch")[0]
    status = _status(name, device.type)
    if not status.startswith("ready"):
        raise RuntimeError(f"gapkern backend {name!r} cannot run on {device.type} tensors: {status}")
    return _load(name)[0]
