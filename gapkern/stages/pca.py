"""Streaming PCA statistics of visual input embeddings, and the PCALatentHead fitted from them (SPEC 4.3).

Rows arrive in chunks, on any number of ranks. Each rank keeps three float64
sums, ``count = n``, ``sum = sum_i x_i`` and ``outer = sum_i x_i x_i^T``; ranks
merge by adding them (one all-reduce), so no step ever holds all embeddings
and N ranks give exactly the statistics of one (up to float64 rounding).

    mean = sum / n
    cov  = (outer - n * mean mean^T) / (n - 1)        (the unbiased covariance, as numpy.cov)
    cov  = U diag(eigenvalues) U^T,  eigenvalues in decreasing order
    explained[k] = (eigenvalues[0] + ... + eigenvalues[k]) / sum(eigenvalues)
    d    = the smallest rank whose explained variance reaches the requested fraction

The uncentered sums cancel when the mean is large against the spread; in
float64 that costs about ``1e-16 * |mean|^2 / eigenvalue`` relative error on
an eigenvalue, far below what a float32 / bfloat16 head can represent.
"""
from __future__ import annotations

import json
import os

import torch

from .. import distributed
from .._io import atomic_save_file, atomic_write, atomic_write_json, read_safetensors
from ..head import PCALatentHead

__all__ = ["PCAStats", "fit_images", "write_fit_summary"]


class PCAStats:
    """count / sum / sum of outer products of rows of width ``dim``, in float64.

    The sums live on ``device``; when it is None they move to the device of the
    first ``update``. Accumulating where the embeddings already are keeps a
    GPU run on the GPU: its float64 ``x.T @ x`` (2 N D^2 flops a chunk) is far
    faster there than on the host, no chunk is copied to the host, and NCCL
    reduces CUDA tensors. On CPU (gloo) everything stays on the CPU.
    """

    def __init__(self, dim: int, device=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int (the embedding width D), got {dim!r}")
        self.dim = dim
        self.device = None if device is None else torch.device(device)
        self._count = self._sum = self._outer = None
        self._eig = None  # (eigenvalues, eigenvectors) cached until the sums change
        if self.device is not None:
            self._allocate(self.device)

    def _allocate(self, device):
        self.device = torch.device(device)
        self._count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    @property
    def count(self) -> int:
        """The number of rows added (over every rank once ``all_reduce`` ran)."""
        return 0 if self._count is None else int(self._count)

    def update(self, x: torch.Tensor) -> "PCAStats":
        """Add rows ``x (N, D)`` of any float dtype; returns self."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (N, {self.dim}), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected shape (N, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0:
            return self
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x: holds NaN or infinite values; the embeddings are broken upstream")
        if self._count is None:
            self._allocate(x.device)
        x = x.to(device=self.device, dtype=torch.float64)
        self._count += x.shape[0]
        self._sum += x.sum(0)
        self._outer.addmm_(x.T, x)
        self._eig = None
        return self

    def merge(self, other: "PCAStats") -> "PCAStats":
        """Add another set of statistics (another shard, a saved partial fit); returns self."""
        if not isinstance(other, PCAStats):
            raise TypeError(f"other: expected a PCAStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"other: expected statistics of width {self.dim}, got {other.dim}")
        if other.count == 0:
            return self
        if self._count is None:
            self._allocate(other.device)
        self._count += other._count.to(self.device)
        self._sum += other._sum.to(self.device)
        self._outer += other._outer.to(self.device)
        self._eig = None
        return self

    def all_reduce(self, group=None) -> "PCAStats":
        """Sum the statistics over the ranks of ``group``; a no-op without an initialised process group.

        Every rank must call it (a collective). A rank that saw no rows takes
        part with zeros. NCCL reduces CUDA tensors: CPU statistics are reduced
        on the current CUDA device and brought back.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._count is None:
            self._allocate("cpu")
        device = self.device
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        for name in ("_count", "_sum", "_outer"):
            value = getattr(self, name).to(device)
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
            setattr(self, name, value.to(self.device))
        self._eig = None
        return self

    # ---- the decomposition ---------------------------------------------------------------------------------

    def mean(self) -> torch.Tensor:
        self._need_rows(1)
        return self._sum / self._count

    def covariance(self) -> torch.Tensor:
        """The float64 (D, D) unbiased covariance of the rows added so far."""
        self._need_rows(2)
        n = self._count.to(torch.float64)
        mean = self._sum / n
        cov = (self._outer - n * torch.outer(mean, mean)) / (n - 1)
        return (cov + cov.T) / 2  # exact symmetry; eigh reads one triangle only

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """eigenvalues (D,) decreasing, clamped at 0, and eigenvectors (D, D) as columns, float64.

        Each eigenvector's sign is fixed so that its largest-magnitude entry is
        positive: eigh's sign is arbitrary, and a fit must not flip a basis
        column between 1 and N ranks over a rounding difference.
        """
        if self._eig is None:
            values, vectors = torch.linalg.eigh(self.covariance())
            values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
            peak = vectors.abs().argmax(0)
            signs = torch.sign(vectors.gather(0, peak[None])).squeeze(0)
            self._eig = values, vectors * torch.where(signs == 0, 1.0, signs)
        return self._eig

    def explained(self) -> torch.Tensor:
        """Cumulative explained variance, float64 (D,): entry k is the share of ranks 1..k+1."""
        values = self.eigen()[0]
        cumulative = values.cumsum(0)
        if not cumulative[-1] > 0:
            raise ValueError("the rows have no variance (all equal): there is nothing to fit")
        return (cumulative / cumulative[-1]).cpu()

    def rank_for(self, variance: float) -> int:
        """The smallest rank whose cumulative explained variance reaches ``variance``."""
        if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance <= 1:
            raise ValueError(f"variance: expected a fraction in (0, 1], got {variance!r}")
        explained = self.explained()
        return min(int(torch.searchsorted(explained, torch.tensor([float(variance)], dtype=torch.float64))) + 1,
                   self.dim)

    def fit(self, variance: float = 0.95, *, rank: int | None = None, whiten: bool = True,
            dtype: torch.dtype = torch.float32) -> PCALatentHead:
        """The PCALatentHead of the top-d eigenvectors; it starts as ``c = U.T (h - mean) / sigma``.

        ``d = rank`` when given, else the rank that keeps ``variance`` of the
        variance. ``sigma = sqrt(eigenvalues[:d])`` when ``whiten``.
        """
        if rank is None:
            rank = self.rank_for(variance)
        elif isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.dim:
            raise ValueError(f"rank: expected an int in [1, {self.dim}], got {rank!r}")
        values, vectors = self.eigen()
        sigma = None
        if whiten:
            floor = float(values[0]) * self.dim * torch.finfo(torch.float64).eps
            if not float(values[rank - 1]) > floor:
                raise ValueError(f"rank: eigenvalue {rank} is zero (the rows span fewer than {rank} "
                                 "directions); choose a smaller rank or whiten=False")
            sigma = values[:rank].sqrt().to(dtype)
        return PCALatentHead(vectors[:, :rank].to(dtype), self.mean().to(dtype), sigma)

    def _need_rows(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"PCAStats: needs at least {n} rows, has {self.count}; call update(x) first")

    # ---- files ---------------------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write the sums to one safetensors file, atomically (resume or merge later with ``load``)."""
        if self._count is None:
            self._allocate("cpu")
        tensors = {"count": self._count.reshape(1).cpu(), "sum": self._sum.cpu(), "outer": self._outer.cpu()}
        atomic_save_file(tensors, path, metadata={"gapkern": json.dumps({"pca_stats": 1, "dim": self.dim})})

    @classmethod
    def load(cls, path: str, device=None) -> "PCAStats":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no PCA statistics file at {path!r}")
        tensors, _ = read_safetensors(path, device=device or "cpu")
        if set(tensors) != {"count", "sum", "outer"}:
            raise ValueError(f"path: {path!r} is not a PCAStats file (tensors {sorted(tensors)})")
        stats = cls(tensors["sum"].shape[0])
        stats.device = tensors["sum"].device
        stats._count, stats._sum, stats._outer = tensors["count"].reshape(()), tensors["sum"], tensors["outer"]
        return stats


def fit_images(model, images, *, settings: dict | None = None, batch_images: int = 8,
               progress: bool | None = None) -> PCAStats:
    """The statistics of the visual input embeddings of ``images`` (``(path, box)`` pairs, e.g.
    ``gapkern.data.sample_images``), streamed through the model's vision tower, every merged token a row.

    Under torchrun rank r takes images r, r + world, ... and the statistics
    are all-reduced, so every rank (each must call this) returns the sums of
    all images. The sums live where the embeddings are (see PCAStats).
    """
    from tqdm import tqdm

    from ..data import image_embeddings

    rank, world = distributed.rank_world()
    stats = PCAStats(model.config.text_config.hidden_size)
    mine = list(images)[rank::world]
    with tqdm(total=len(mine), desc="pca", unit="image", disable=distributed.bar_disable(progress)) as bar:
        for embeds, _ in image_embeddings(model, mine, settings=settings, batch_images=batch_images):
            stats.update(embeds)
            bar.update()
    return stats.all_reduce()


def write_fit_summary(stats: PCAStats, rank: int, json_path: str, png_path: str | None = None,
                      *, variance: float | None = None) -> dict:
    """Write the fit's JSON (d, eigenvalues, cumulative explained variance) and a PNG of the curve marking d.

    Both files are written atomically. Returns the JSON's content.
    """
    values, explained = stats.eigen()[0].cpu(), stats.explained()
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= stats.dim:
        raise ValueError(f"rank: expected an int in [1, {stats.dim}], got {rank!r}")
    summary = {"d": rank, "dim": stats.dim, "count": stats.count, "variance": variance,
               "explained_at_d": float(explained[rank - 1]),
               "eigenvalues": values.tolist(), "explained": explained.tolist()}

    atomic_write_json(json_path, summary, indent=None, end="")
    if png_path is not None:
        atomic_write(png_path, lambda tmp: _plot_curve(explained, rank, tmp))
    return summary


def _plot_curve(explained: torch.Tensor, rank: int, path: str) -> None:
    # Figure + the Agg canvas directly: no pyplot global state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ranks = torch.arange(1, explained.shape[0] + 1)
    ax.plot(ranks.numpy(), explained.numpy(), lw=1.5)
    share = float(explained[rank - 1])
    ax.axvline(rank, color="tab:red", ls="--", lw=1)
    ax.axhline(share, color="tab:red", ls=":", lw=1)
    ax.annotate(f"d = {rank} ({share:.1%})", (rank, share), textcoords="offset points", xytext=(6, -14),
                color="tab:red")
    if explained.shape[0] > 64:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 1, 10, 100 rather than 10^0, 10^1, 10^2
    ax.set(xlabel="rank", ylabel="cumulative explained variance", ylim=(0, 1.02),
           title="PCA of the visual input embeddings")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
