"""File writes that leave no half-written file behind, and reads that name the file they failed on."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["disk_full", "no_space", "atomic_save_file", "atomic_write", "atomic_write_text", "atomic_write_json",
           "atomic_folder", "read_safetensors", "read_json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(exc: BaseException, folder: str) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, means its device is full: an OSError ENOSPC or
    EDQUOT (another errno is what it says), a writer that says errno 28 only in its text (safetensors), or one
    that says nothing useful (torch.save: "unexpected pos") while the device has less than a MiB left."""
    if not isinstance(exc, Exception):
        return False  # KeyboardInterrupt, SystemExit
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)  # it says what it is
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder or ".").free < 1 << 20
    except OSError:
        return False


def no_space(folder: str) -> OSError:
    """The error a write into ``folder`` on a full device raises: one line, what was kept, what to do."""
    return OSError(errno.ENOSPC, f"no space left on device writing into {os.path.abspath(folder)!r}; what "
                                 "was written before is kept: free some space and rerun to finish")


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path``; on failure remove the temp file.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        full = disk_full(exc, folder)  # before the temp file goes: it holds the space the write took
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise no_space(folder) from exc
        raise


def atomic_save_file(tensors, path: str, metadata=None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` in UTF-8, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, obj, *, indent: int | None = 1, ensure_ascii: bool = True, end: str = "\n") -> None:
    """Write ``json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + end`` to ``path``, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + end)


def atomic_folder(path: str, write, stale=lambda name: False) -> None:
    """Call ``write(tmp_folder)``, then move every file it wrote into the folder ``path``: all or none.

    Files of ``path`` that the write replaces, and those ``stale(name)`` marks (a previous save's
    shards), are set aside and put back if a move fails, so a failed write leaves ``path`` as it was
    (a checkpoint's new config.json never sits beside its old weights).
    """
    path = os.path.realpath(path)  # the temporary folder must sit on the same file system
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"path: {path!r} is a file, expected a folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        try:
            write(tmp)
        except Exception as exc:
            if disk_full(exc, tmp):
                raise no_space(path) from exc
            raise
        # the folder itself is made, not renamed from tmp: mkdtemp's folder is private (mode 0700)
        new_folder = not os.path.exists(path)
        os.makedirs(path, exist_ok=True)
        try:
            _move_in(tmp, path, stale)
        except BaseException:
            if new_folder:
                os.rmdir(path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_in(tmp: str, path: str, stale) -> None:
    new = sorted(os.listdir(tmp))
    old = [name for name in os.listdir(path) if name not in new and stale(name)]
    backup = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".old-{os.path.basename(path)}-")
    set_aside, moved_in = [], []
    try:
        for name in new:
            if os.path.lexists(os.path.join(path, name)):
                os.replace(os.path.join(path, name), os.path.join(backup, name))
                set_aside.append(name)
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
            moved_in.append(name)
        for name in old:
            os.replace(os.path.join(path, name), os.path.join(backup, name))
            set_aside.append(name)
    except BaseException:
        for name in moved_in:
            _remove(os.path.join(path, name))
        for name in set_aside:
            os.replace(os.path.join(backup, name), os.path.join(path, name))
        os.rmdir(backup)  # empty now; had a restore failed, the old files would still be there
        raise
    shutil.rmtree(backup)


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def read_safetensors(path: str, device="cpu") -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file; a damaged or truncated file is a ValueError naming it."""
    try:
        with safe_open(path, "pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"path: {path!r} is not a readable safetensors file ({exc})") from None


def read_json(path: str):
    """A JSON file's content; a file that is not JSON is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"path: {path!r} is not a JSON file ({exc})") from None
