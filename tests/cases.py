"""Shared test data: backends, dtypes, shapes and a random latent-step case."""
from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="f16"),
]
# (D, d): the 7B shape, the 3B hidden size, and odd sizes.
SHAPES = [
    pytest.param((3584, 629), id="D3584-d629"),
    pytest.param((2048, 311), id="D2048-d311"),
    pytest.param((200, 37), id="D200-d37"),
]
ROWS = [pytest.param(b, id=f"B{b}") for b in (0, 1, 3, 64)]


def device_for(backend: str) -> str:
    return "cuda" if (backend == "cuda" or HAS_CUDA) else "cpu"


def _strided(rows, cols, dtype, device, scale=1.0):
    """A (rows, cols) view with a gap between rows and every other column."""
    return (torch.randn(rows, 2 * cols + 3, dtype=torch.float64) * scale).to(dtype).to(device)[:, 1:2 * cols + 1:2]


def _column_major(rows, cols, t):
    return t.T.contiguous().T


class Case:
    """Random inputs of one latent step, stored in ``dtype`` on ``device``."""

    def __init__(self, D, d, B, dtype, device, strided=False):
        g = torch.Generator().manual_seed(1000 * D + 10 * d + B)

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

        basis = torch.linalg.qr(rnd(D, d))[0]
        tau = rnd(B).abs() * 5 + 1
        if B >= 3:
            tau[1] = 0.0  # a row with no calibration target stays uncalibrated
        tensors = dict(
            hidden=rnd(B, D), weight=rnd(D, d, scale=D ** -0.5), bias=rnd(d, scale=0.1),
            basis=basis, mean=rnd(D, scale=0.05), sigma=rnd(d).abs() + 0.5,
        )
        for name, t in tensors.items():
            setattr(self, name, t.to(dtype).to(device))
        self.tau = tau.to(torch.float32).to(device)
        self.mask = (torch.arange(B) % 2 == 0).to(device)
        self.token_ids = torch.randint(0, 97, (B,), generator=g).to(device)
        self.embed = rnd(97, D).to(dtype).to(device)
        if strided:
            self.hidden = _strided(B, D, dtype, device)
            self.weight = _column_major(D, d, self.weight)
            self.basis = _column_major(D, d, self.basis)
        self.D, self.d, self.B, self.dtype, self.device = D, d, B, dtype, device

    def out_buffer(self, strided=False, fill=7.0):
        """A sentinel-filled output; strided: the middle position of a (B, 3, D) buffer."""
        if strided:
            return torch.full((self.B, 3, self.D), fill, dtype=self.dtype, device=self.device)[:, 1]
        return torch.full((self.B, self.D), fill, dtype=self.dtype, device=self.device)


def cuda_graph(step, warmups: int = 1):
    """``step()`` captured in a CUDA graph, after ``warmups`` runs on a side stream (they compile, load
    and allocate what the step keeps, so that the capture records launches only)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def reflect(basis, mean):
    """(I - 2 v v.T) basis with v = mean / ||mean||: still orthonormal, and basis.T @ mean changes sign."""
    v = mean.double().cpu() / mean.double().cpu().norm()
    u = basis.double().cpu()
    return (u - 2 * v[:, None] * (v @ u)[None, :]).to(basis.dtype).to(basis.device)


# Known and documented (gapkern/ops/_cache.py): the cuda backend's packed copies of weight.T and
# basis cannot see writes through .data; gapkern.ops.clear_caches() after such writes.
PACKED_DATA_EDITS = ("cuda and triton backends: packed (cuda) or rank-padded (triton) weight/basis copies cannot see "
                     ".data writes, which bump no version counter (clear_caches())")


# ---- the op parity files' shared grid (tests/ops/test_<op>.py) ------------------------------------------------


def case_for(backend, shape, rows, dtype, strided=False):
    """The :class:`Case` of one grid point: ``shape`` (D, d), ``rows`` B, on ``backend``'s device."""
    D, d = shape
    return Case(D, d, rows, dtype, device_for(backend), strided=strided)


LAYOUTS = [pytest.param(False, id="contiguous"), pytest.param(True, id="strided")]
grid = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
dtypes = pytest.mark.parametrize("dtype", DTYPES)
shapes = pytest.mark.parametrize("shape", SHAPES)
rows = pytest.mark.parametrize("B", ROWS)
