"""File writes that leave no half-written file behind."""
from __future__ import annotations

import os
import tempfile

from safetensors.torch import load_file, save_file

__all__ = ["atomic_save_file", "load_file", "atomic_write"]


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path``; on failure remove the temp file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save_file(tensors, path: str, metadata=None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
