"""Where a stage writes: checked up front (a file where a folder goes, a folder that cannot be written) and held
by one process at a time (issue 17 items 10 and 13).

:func:`check_writable` refuses an ``out`` that is the wrong kind of thing, or under a folder this process cannot
write into, before any work is done. :func:`out_lock` holds an exclusive ``flock`` on ``LOCKFILE`` beside the
output for the run's duration: a second process on the same output is refused at once, never interleaved. The
kernel drops the lock when its holder dies (kill -9 included), so a killed run never blocks its rerun.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import tempfile

__all__ = ["OutputError", "check_writable", "out_lock", "holds_out"]


class OutputError(ValueError):
    """The output path cannot be written, or another process holds it."""


def check_writable(path: str, *, folder: bool, name: str = "out") -> None:
    """``path`` can become the output (a folder when ``folder``, else a file): refused by ``name`` otherwise."""
    if folder and os.path.isfile(path):
        raise OutputError(f"{name}: {path!r} is a file; expected a folder")
    if not folder and os.path.isdir(path):
        raise OutputError(f"{name}: {path!r} is a folder; expected a file path")
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{name}: {parent!r} is a file, so {path!r} cannot be made under it")
    try:  # a probe, not os.access: a read-only mount refuses root too
        fd, probe = tempfile.mkstemp(prefix=".gapkern-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{name}: cannot write into {parent!r} ({exc.strerror or exc}); "
                          "choose a writable --out") from None


@contextlib.contextmanager
def out_lock(path: str, *, name: str = "out"):
    """Hold ``path + '.lock'`` exclusively while the block runs; another holder is an OutputError."""
    lock = os.path.abspath(path) + ".lock"
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"{name}: {path!r} is being written by another process (pid {holder}, lock "
                              f"{lock}); wait for it to finish or choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:  # not a file an earlier holder unlinked as we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def holds_out(*, folder: bool):
    """Decorate a stage function taking ``out``: ``out`` is checked with :func:`check_writable` on every rank,
    then rank 0 holds :func:`out_lock` while the function runs (the other ranks wait at its first barrier)."""
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            from . import distributed

            out = signature.bind(*args, **kwargs).arguments["out"]
            check_writable(out, folder=folder)
            with out_lock(out) if distributed.rank_world()[0] == 0 else contextlib.nullcontext():
                return function(*args, **kwargs)
        return wrapper
    return decorate
