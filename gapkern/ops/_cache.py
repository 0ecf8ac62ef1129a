"""Buffers and derived tensors kept between op calls, one place for the Triton and cuda backends.

Workspaces are scratch buffers reused per (kind, shape, dtype, device), so that a decode step
allocates nothing and a CUDA graph can capture it. At most ``LIMIT`` of them are kept, the least
recently used dropped first, except that a buffer used while a CUDA stream is capturing is pinned:
the captured graph keeps its address. ``clear_caches()`` drops everything (graphs captured before
must not be replayed after it).

Derived values (the cuda backend's packed weights) are kept while the tensors they come from are
alive and unmodified by their version counter. Results never depend on a cached value that
cannot be checked: tensors without a version counter (made under ``torch.inference_mode``) are
not cached. Writes through ``.data`` keep the version counter still and cannot be seen; call
``clear_caches()`` after them.

Passed checks (an orthonormal basis) are remembered the same way, inference tensors included: a
check skipped after an unseen edit changes no result, a stale value would.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

LIMIT = 32
_workspaces: OrderedDict = OrderedDict()
_pinned: set = set()
_derived: dict = {}
_checks: dict = {}


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def workspace(kind: str, shape, device, dtype=torch.float32, zeroed: bool = False) -> torch.Tensor:
    """The ``kind`` scratch buffer of this shape, dtype and device (zero-filled when first made if ``zeroed``)."""
    device = torch.device(device)
    key = (kind, tuple(shape), dtype, device)
    buf = _workspaces.get(key)
    if buf is None:
        buf = _workspaces[key] = (torch.zeros if zeroed else torch.empty)(tuple(shape), dtype=dtype, device=device)
        _evict()
    else:
        _workspaces.move_to_end(key)
    if capturing(device):
        _pinned.add(key)
    return buf


def _evict():
    unpinned = [k for k in _workspaces if k not in _pinned]
    for key in unpinned[:max(0, len(unpinned) - LIMIT)]:
        del _workspaces[key]  # the caching allocator reuses it in stream order: safe on this stream


def _stamp(t):
    """What must not change for a value derived from ``t`` to stay valid (no version: inference tensor)."""
    if t is None:
        return None
    version = None if t.is_inference() else t._version
    return t.data_ptr(), version, t.shape, t.stride(), t.dtype, t.device


def _forget_when_freed(store: dict, key, tensors):
    """Drop ``store[key]`` when any of ``tensors`` is freed, so that live ids name live tensors."""
    for t in tensors:
        if t is not None:
            weakref.finalize(t, store.pop, key, None)


def derived(kind: str, make, *tensors):
    """make() (run without autograd), kept until one of ``tensors`` (None allowed) is freed, moved or
    modified in place; recomputed on every call when one of them keeps no version counter."""
    if any(t is not None and t.is_inference() for t in tensors):
        with torch.no_grad():
            return make()
    key = (kind, *map(id, tensors))
    stamps = tuple(map(_stamp, tensors))
    hit = _derived.get(key)
    if hit is not None and hit[0] == stamps:
        return hit[1]
    with torch.no_grad():
        value = make()
    if hit is None:
        _forget_when_freed(_derived, key, tensors)
    _derived[key] = (stamps, value)
    return value


def passed(check: str, t) -> bool:
    """Whether ``check`` passed for ``t`` as it is now."""
    hit = _checks.get((check, id(t)))
    return hit is not None and hit == _stamp(t)


def remember_pass(check: str, t) -> None:
    key = (check, id(t))
    if key not in _checks:
        _forget_when_freed(_checks, key, (t,))
    _checks[key] = _stamp(t)


def clear_caches() -> None:
    """Drop every kept workspace, derived value and passed check."""
    _workspaces.clear()
    _pinned.clear()
    _derived.clear()
    _checks.clear()
