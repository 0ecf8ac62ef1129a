"""PCAStats against numpy's float64 eigh, streamed in chunks, over 2 gloo ranks; the head it fits; its files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gapkern import PCALatentHead
from gapkern.pca import PCAStats, write_fit_summary

D = 24


def embeddings(n=600, dim=D, seed=0, offset=3.0):
    """Rows with a spread-out spectrum (scales 4 .. 0.3), a random rotation and a mean away from 0."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.6, -0.5, dim, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    mean = offset * torch.randn(dim, generator=g, dtype=torch.float64)
    return mean + (torch.randn(n, dim, generator=g, dtype=torch.float64) * scales) @ rotation.T


def numpy_pca(x: torch.Tensor):
    """Decreasing eigenvalues and eigenvectors of numpy's float64 covariance, largest entry of each made positive."""
    values, vectors = np.linalg.eigh(np.cov(x.double().numpy(), rowvar=False))
    values, vectors = values[::-1], vectors[:, ::-1]
    peak = np.abs(vectors).argmax(0)
    return values, vectors * np.sign(vectors[peak, np.arange(vectors.shape[1])]), x.double().numpy().mean(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_eigen_matches_numpy_eigh_of_the_float64_covariance(dtype):
    x = embeddings().to(dtype)
    stats = PCAStats(D).update(x)
    values, vectors = stats.eigen()
    ref_values, ref_vectors, ref_mean = numpy_pca(x)
    assert stats.count == x.shape[0]
    np.testing.assert_allclose(values.numpy(), ref_values, rtol=1e-9)
    np.testing.assert_allclose(vectors.numpy(), ref_vectors, atol=1e-7)  # the sign convention included
    np.testing.assert_allclose(stats.mean().numpy(), ref_mean, rtol=1e-12)
    explained = stats.explained()
    assert explained.dtype == torch.float64 and explained.shape == (D,)
    np.testing.assert_allclose(explained.numpy(), np.cumsum(ref_values) / ref_values.sum(), rtol=1e-12)
    assert explained[-1] == 1.0


def test_chunked_updates_equal_one_update():
    x = embeddings(n=601)
    whole = PCAStats(D).update(x)
    chunked = PCAStats(D)
    for chunk in torch.split(x, [1, 37, 200, 0, 363]):
        chunked.update(chunk)
    assert chunked.count == whole.count == 601
    torch.testing.assert_close(chunked.covariance(), whole.covariance(), rtol=1e-12, atol=1e-12)
    a, b = chunked.fit(rank=6), whole.fit(rank=6)
    for name in ("basis", "mean", "sigma", "weight", "bias"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6)


def low_rank_plus_noise(n=4000, dim=64, signal_rank=5, noise=0.1, seed=1):
    """``signal_rank`` directions of variance 10 each, isotropic noise of variance noise^2 in every direction."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(dim, signal_rank, generator=g, dtype=torch.float64))[0]
    signal = (10 ** 0.5) * torch.randn(n, signal_rank, generator=g, dtype=torch.float64) @ directions.T
    return 5.0 + signal + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)


def test_rank_at_095_of_a_low_rank_set():
    """Signal 5 x 10 against noise 64 x 0.01: 4 directions keep ~79%, 5 keep ~98.7%, 3 keep ~59%."""
    stats = PCAStats(64).update(low_rank_plus_noise().float())
    assert stats.rank_for(0.95) == 5
    assert stats.fit().rank == 5  # the default variance is 0.95
    assert stats.rank_for(0.5) == 3
    assert stats.rank_for(1.0) <= 64
    assert stats.fit(0.5, whiten=False).rank == 3


@pytest.mark.parametrize("whiten", [True, False], ids=["whitened", "plain"])
def test_head_starts_as_the_exact_projection(whiten):
    x = embeddings()
    head = PCAStats(D).update(x).fit(rank=7, whiten=whiten)
    values, vectors, mean = numpy_pca(x)
    basis = torch.from_numpy(vectors[:, :7].copy())
    assert isinstance(head, PCALatentHead) and head.rank == 7 and head.hidden_size == D
    assert head.weight.dtype == torch.float32
    torch.testing.assert_close(head.basis.double(), basis, rtol=0, atol=1e-6)
    if whiten:
        torch.testing.assert_close(head.sigma.double(), torch.from_numpy(np.sqrt(values[:7]).copy()), rtol=1e-6,
                                   atol=0)
    else:
        assert head.sigma is None
    h = embeddings(n=16, seed=5)
    expected = (h - torch.from_numpy(mean)) @ basis
    if whiten:
        expected = expected / torch.from_numpy(np.sqrt(values[:7]).copy())
    torch.testing.assert_close(head(h.float()).double(), expected, rtol=1e-4, atol=1e-4)


# ---- 2 ranks (gloo) --------------------------------------------------------------------------------------


def _rank_main(rank, world, init_file, out_folder):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = embeddings(n=601)
        mine = [x[:250], x[250:]][rank]  # uneven shards
        stats = PCAStats(D)
        for chunk in torch.split(mine, 64):
            stats.update(chunk.float())
        stats.all_reduce()
        stats.fit(rank=6).save(os.path.join(out_folder, f"head{rank}.safetensors"))
        stats.save(os.path.join(out_folder, f"stats{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_head_of_one(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x = embeddings(n=601)
    one = PCAStats(D)
    for chunk in torch.split(x, 64):
        one.update(chunk.float())
    single = one.fit(rank=6)
    for rank in (0, 1):
        stats = PCAStats.load(str(tmp_path / f"stats{rank}.safetensors"))
        assert stats.count == 601
        torch.testing.assert_close(stats.covariance(), one.covariance(), rtol=1e-12, atol=1e-12)
        head = PCALatentHead.load(str(tmp_path / f"head{rank}.safetensors"))
        for name in ("basis", "mean", "sigma", "weight", "bias"):
            torch.testing.assert_close(getattr(head, name), getattr(single, name), rtol=1e-6, atol=1e-6)


def test_all_reduce_is_a_no_op_without_a_process_group():
    assert not dist.is_initialized()
    stats = PCAStats(D).update(embeddings(n=10))
    before = stats.covariance().clone()
    assert stats.all_reduce() is stats and stats.count == 10
    torch.testing.assert_close(stats.covariance(), before, rtol=0, atol=0)


# ---- files ---------------------------------------------------------------------------------------------


def test_save_load_and_merge_resume_a_fit(tmp_path):
    x = embeddings(n=300)
    first = PCAStats(D).update(x[:120])
    first.save(str(tmp_path / "part.safetensors"))
    resumed = PCAStats.load(str(tmp_path / "part.safetensors")).update(x[120:200])
    resumed.merge(PCAStats(D).update(x[200:]))
    whole = PCAStats(D).update(x)
    assert resumed.count == 300
    torch.testing.assert_close(resumed.covariance(), whole.covariance(), rtol=1e-12, atol=1e-12)
    assert [p.name for p in tmp_path.iterdir()] == ["part.safetensors"]  # no temp file left


def test_fit_summary_json_and_png(tmp_path):
    stats = PCAStats(64).update(low_rank_plus_noise())
    d = stats.rank_for(0.95)
    summary = write_fit_summary(stats, d, str(tmp_path / "pca.json"), str(tmp_path / "pca.png"), variance=0.95)
    with open(tmp_path / "pca.json") as f:
        assert json.load(f) == summary
    assert summary["d"] == 5 and summary["count"] == 4000 and summary["variance"] == 0.95
    assert len(summary["eigenvalues"]) == len(summary["explained"]) == 64
    assert summary["explained"] == sorted(summary["explained"]) and summary["explained"][-1] == 1.0
    assert summary["explained_at_d"] >= 0.95 > summary["explained"][3]
    with open(tmp_path / "pca.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pca.json", "pca.png"]


def test_failed_plot_leaves_no_png(tmp_path, monkeypatch):
    import gapkern.pca as pca

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pca, "_plot_curve", broken)
    stats = PCAStats(D).update(embeddings(n=50))
    with pytest.raises(RuntimeError, match="disk full"):
        write_fit_summary(stats, 3, str(tmp_path / "pca.json"), str(tmp_path / "pca.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pca.json"]


# ---- errors --------------------------------------------------------------------------------------------


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="dim: expected a positive int"):
        PCAStats(0)
    stats = PCAStats(D)
    with pytest.raises(ValueError, match="needs at least 2 rows, has 0"):
        stats.fit()
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 24\), got \(5, 23\)"):
        stats.update(torch.randn(5, D - 1))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        stats.update(torch.ones(5, D, dtype=torch.int64))
    bad = torch.randn(5, D)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="x: holds NaN or infinite"):
        stats.update(bad)
    assert stats.count == 0  # a rejected chunk adds nothing
    stats.update(torch.randn(1, D))
    with pytest.raises(ValueError, match="needs at least 2 rows, has 1"):
        stats.explained()
    stats.update(embeddings(n=40).float())
    for variance in (0, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="variance: expected a fraction in"):
            stats.fit(variance)
    for rank in (0, D + 1, 2.0, True):
        with pytest.raises(ValueError, match=r"rank: expected an int in \[1, 24\]"):
            stats.fit(rank=rank)
    flat = PCAStats(D).update(torch.ones(4, D))
    with pytest.raises(ValueError, match="no variance"):
        flat.fit()
    line = PCAStats(D).update(torch.randn(30, 1, dtype=torch.float64) * torch.randn(1, D, dtype=torch.float64))
    for whiten in (True, False):  # a noise direction is no direction, whitened or not (issue 17 item 3)
        with pytest.raises(ValueError, match="rank: eigenvalue 2 is .*, rounding noise"):
            line.fit(rank=2, whiten=whiten)
    assert line.fit(rank=1, whiten=False).rank == 1
    with pytest.raises(FileNotFoundError, match="path: no PCA statistics file"):
        PCAStats.load(str(tmp_path / "missing.safetensors"))
    PCALatentHead(torch.eye(D)[:, :2], torch.zeros(D)).save(str(tmp_path / "head.safetensors"))
    with pytest.raises(ValueError, match="is not a PCAStats file"):
        PCAStats.load(str(tmp_path / "head.safetensors"))
    stats.save(str(tmp_path / "stats.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "stats.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.safetensors' is not a readable safetensors file"):
        PCAStats.load(str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="other: expected statistics of width 24"):
        stats.merge(PCAStats(D + 1))


def test_hidden_size_3584_streams_in_bounded_memory():
    """The 7B width: chunks of bfloat16 rows add into one (D, D) float64 matrix; no row is kept."""
    dim = 3584
    g = torch.Generator().manual_seed(0)
    stats = PCAStats(dim)
    chunks = [torch.randn(48, dim, generator=g).to(torch.bfloat16) for _ in range(3)]
    for chunk in chunks:
        stats.update(chunk)
    assert stats.count == 144
    held = [t for t in vars(stats).values() if isinstance(t, torch.Tensor)]
    assert sum(t.numel() for t in held) == 1 + dim + dim * dim  # count, sum, outer: independent of N
    x = torch.cat(chunks).double()
    rows = slice(0, 64)  # a corner of the covariance against the direct float64 computation
    expected = torch.from_numpy(np.cov(x.numpy(), rowvar=False)[rows, rows])
    torch.testing.assert_close(stats.covariance()[rows, rows], expected, rtol=1e-10, atol=1e-12)


def test_noise_and_too_few_rows_are_refused_saying_why():
    """Issue 17 item 3: four equal rows (a 1x1 image's merged tokens) differ by rounding only; their ~1e-17
    eigenvalues once made a d=3 head with explained variance 1.0. Too few rows for the rank is refused too."""
    rows = torch.rand(1, 64, dtype=torch.float64).repeat(4, 1)
    noisy = PCAStats(64).update(rows + torch.randn(4, 64, dtype=torch.float64) * 1e-16 * rows)  # last-bit noise
    assert float(noisy.eigen()[0][0]) > 0  # the cancellation leaves a positive, meaningless eigenvalue
    with pytest.raises(ValueError, match="no variance above rounding noise"):
        noisy.fit(0.95)
    few = PCAStats(8).update(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank: 3 embeddings span at most 2 directions, too few for rank 3"):
        few.fit(rank=3)
    assert few.fit(rank=2).rank == 2
