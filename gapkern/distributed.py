"""Ranks under ``torchrun``: the stages shard their work over ranks and meet at barriers / all-reduces.

Without ``torchrun`` (no ``WORLD_SIZE`` above 1) everything runs as rank 0 of 1 and the collectives are no-ops.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "rank_world", "barrier", "close", "bar_disable"]


def init_from_env(device_type: str) -> tuple[int, int, int]:
    """``(rank, world, local_rank)``; under torchrun, initialises the default process group once:
    NCCL when the ranks run on CUDA (each on ``cuda:LOCAL_RANK``), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world = rank_world()
    return rank, world, local


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def bar_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for this rank: only rank 0 shows progress; None (the default) shows it on a terminal."""
    if progress is False or rank_world()[0] != 0:
        return True
    return None if progress is None else False
