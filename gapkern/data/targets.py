"""Latent targets on disk: safetensors shards keyed ``"{id}/{step}"`` -> (K, D), and a JSON index (SPEC 4.2).

The samples that have latent steps are cut, in file order, into shards of
``shard_size`` samples; shard i is ``targets-0000i.safetensors``. Each shard
is written atomically and carries its keys and the run's ``meta`` (model, g,
...) in its header, so a rerun knows which shards are finished (file there,
same keys, same meta) and computes only the others. ``index.json`` is
written last, when every shard is there: a folder with an index is complete.

    writer = TargetWriter(folder, samples, meta={"model": path, "g": 4})
    for index, chunk in writer.pending(rank=rank, world=world):
        writer.write(index, {key: pooled (K, D) for every key of chunk})
    writer.finish()                       # rank 0, after every rank wrote
    reader = TargetReader(folder); reader["q17/1"]; reader.targets(sample)  # (steps, K, D)
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from .._io import atomic_save_file, atomic_write_json, read_json

__all__ = ["latent_keys", "TargetWriter", "TargetReader", "INDEX", "pool_targets"]

INDEX = "index.json"
_HEADER = "gapkern_targets"


def latent_keys(sample: dict) -> list[str]:
    """The target keys ``"{id}/{step}"`` of a sample's latent steps, in order (step = the index in ``steps``)."""
    return [f"{sample['id']}/{i}" for i, step in enumerate(sample.get("steps") or []) if "latent" in step]


def _plain(meta) -> dict:
    """``meta`` as JSON reads it back (tuples become lists), so a rerun's meta compares equal."""
    try:
        return json.loads(json.dumps(meta or {}))
    except TypeError as e:
        raise ValueError(f"meta: expected a JSON-serialisable dict, got {meta!r} ({e})") from None


class TargetWriter:
    """Writes the targets of ``samples`` (the output of ``load_samples``) into ``folder``, resumably."""

    def __init__(self, folder: str, samples: list[dict], *, meta: dict | None = None, shard_size: int = 64):
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size: expected a positive int, got {shard_size!r}")
        self.folder, self.meta = folder, _plain(meta)
        with_latents = [s for s in samples if latent_keys(s)]
        self.shards = [with_latents[i:i + shard_size] for i in range(0, len(with_latents), shard_size)]
        self.keys = [[k for s in shard for k in latent_keys(s)] for shard in self.shards]

    def shard_name(self, index: int) -> str:
        return f"targets-{index:05d}.safetensors"

    def header(self, index: int) -> dict | None:
        """The header of shard ``index`` as written, or None when there is no readable shard."""
        path = os.path.join(self.folder, self.shard_name(index))
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                return json.loads((f.metadata() or {})[_HEADER])
        except Exception:  # not a shard of ours (or unreadable): it is rewritten
            return None

    def is_done(self, index: int) -> bool:
        header = self.header(index)
        return header is not None and header["keys"] == self.keys[index] and header["meta"] == self.meta

    def pending(self, *, rank: int = 0, world: int = 1) -> list[tuple[int, list[dict]]]:
        """(index, samples) of the unfinished shards of this rank (shards i with i % world == rank)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank!r}")
        return [(i, shard) for i, shard in enumerate(self.shards) if i % world == rank and not self.is_done(i)]

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard ``index``: ``tensors`` maps each of its keys to one (K, D) target."""
        if not 0 <= index < len(self.shards):
            raise ValueError(f"index: expected a shard in [0, {len(self.shards)}), got {index!r}")
        expected = self.keys[index]
        if sorted(tensors) != sorted(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"tensors: shard {index} needs exactly its keys; missing {missing}, unexpected {extra}")
        shapes = {tuple(t.shape) for t in tensors.values()}
        dtypes = {t.dtype for t in tensors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(dtypes) != 1:
            raise ValueError(f"tensors: expected every target (K, D) of one shape and dtype, got {shapes}, {dtypes}")
        header = {"keys": expected, "meta": self.meta, "shape": list(next(iter(shapes))),
                  "dtype": str(next(iter(dtypes))).removeprefix("torch.")}
        # one copy each: contiguous, on the CPU, owning its memory (safetensors refuses tensors that share it)
        data = {k: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for k, t in tensors.items()}
        atomic_save_file(data, os.path.join(self.folder, self.shard_name(index)),
                         metadata={_HEADER: json.dumps(header)})

    def finish(self) -> dict:
        """Check that every shard is there and agrees on (K, D) and dtype; write ``index.json``; return it."""
        headers = [self.header(i) if self.is_done(i) else None for i in range(len(self.shards))]
        missing = [self.shard_name(i) for i, h in enumerate(headers) if h is None]
        if missing:
            raise RuntimeError(f"folder: {len(missing)} shard(s) of {len(self.shards)} not written yet "
                               f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); no index written")
        layouts = {(tuple(h["shape"]), h["dtype"]) for h in headers}
        if len(layouts) > 1:
            raise RuntimeError(f"folder: shards disagree on the target shape / dtype: {sorted(layouts)}")
        shape, dtype = next(iter(layouts)) if layouts else (None, None)
        index = {"format": "gapkern-targets/1", "meta": self.meta, "shape": list(shape) if shape else None,
                 "dtype": dtype, "shards": [self.shard_name(i) for i in range(len(self.shards))],
                 "keys": {k: self.shard_name(i) for i, keys in enumerate(self.keys) for k in keys}}
        atomic_write_json(os.path.join(self.folder, INDEX), index, indent=None, end="")
        return index


class TargetReader:
    """Reads a finished target folder: ``reader[key] -> (K, D)``, ``reader.targets(sample) -> (steps, K, D)``.

    Shards are memory-mapped on first use, per process (DataLoader workers
    open their own).
    """

    def __init__(self, folder: str):
        path = os.path.join(folder, INDEX)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"folder: no {INDEX} in {folder!r}; build the targets to the end first")
        self.index = read_json(path)
        self.folder, self._open = folder, {}

    @property
    def shape(self) -> tuple[int, int] | None:
        return None if self.index["shape"] is None else tuple(self.index["shape"])

    def __len__(self) -> int:
        return len(self.index["keys"])

    def __contains__(self, key: str) -> bool:
        return key in self.index["keys"]

    def keys(self) -> list[str]:
        return list(self.index["keys"])

    def __getitem__(self, key: str) -> torch.Tensor:
        shard = self.index["keys"].get(key)
        if shard is None:
            raise KeyError(f"key: no target {key!r} in {self.folder!r}")
        if shard not in self._open:
            self._open[shard] = safe_open(os.path.join(self.folder, shard), framework="pt")
        return self._open[shard].get_tensor(key)

    def targets(self, sample: dict) -> torch.Tensor:
        """The targets of a sample's latent steps stacked in order: (steps, K, D); (0, K, D) for none."""
        keys = latent_keys(sample)
        if not keys:
            k, d = self.shape or (0, 0)
            return torch.zeros(0, k, d, dtype=getattr(torch, self.index["dtype"] or "float32"))
        return torch.stack([self[key] for key in keys])

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}  # open handles stay in the process that opened them


def pool_targets(embeds: torch.Tensor, grid, g: int) -> torch.Tensor:
    """``embeds (h*w, D)`` in row-major merged-grid order -> ``(g*g, D)``, adaptive-average-pooled, row-major.

    Cell (i, j) averages rows ``floor(i*h/g) .. ceil((i+1)*h/g) - 1`` and
    columns ``floor(j*w/g) .. ceil((j+1)*w/g) - 1`` (adaptive pooling's bins,
    which overlap when g does not divide the grid). Accumulates in float32 at
    least; returns ``embeds``' dtype.
    """
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 2 or not embeds.is_floating_point():
        raise ValueError(f"embeds: expected a float tensor (h*w, D), got {getattr(embeds, 'shape', embeds)!r}")
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)):
        raise ValueError(f"grid: expected (h, w), two positive ints, got {grid!r}")
    h, w = grid
    if h * w != embeds.shape[0]:
        raise ValueError(f"grid: {h}x{w} = {h * w} cells, but embeds has {embeds.shape[0]} rows")
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"g: expected a positive int (K = g*g targets), got {g!r}")
    dim = embeds.shape[1]
    compute = torch.promote_types(embeds.dtype, torch.float32)
    cells = embeds.to(compute).T.reshape(1, dim, h, w)
    pooled = torch.nn.functional.adaptive_avg_pool2d(cells, g)
    return pooled.reshape(dim, g * g).T.contiguous().to(embeds.dtype)
