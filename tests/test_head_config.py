"""PCALatentHead and GapConfig: the head's PCA start, its file round trip, the config's checks."""
from __future__ import annotations

import os

import pytest
import torch

import gapkern
from gapkern import GapConfig, PCALatentHead
from gapkern.models import tiny_tokenizer

import reference as R

D, d = 48, 6


def head_and_data(whitened=True):
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))[0].float()
    mean = torch.randn(D, generator=g)
    sigma = torch.rand(d, generator=g) + 0.5 if whitened else None
    return PCALatentHead(basis, mean, sigma), basis, mean, sigma


@pytest.mark.parametrize("whitened", [False, True], ids=["plain", "whitened"])
def test_head_starts_as_the_pca_projection(whitened):
    """A vector in the PCA subspace is predicted exactly and rebuilt exactly by the fused step."""
    head, basis, mean, sigma = head_and_data(whitened)
    coeffs = torch.randn(4, d, dtype=torch.float64)
    raw = coeffs if sigma is None else coeffs * sigma.double()
    h = (mean.double() + raw @ basis.double().T).float()
    torch.testing.assert_close(head(h).double(), coeffs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.target_coeffs(h).double(), coeffs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.latents(h).double(), h.double(), rtol=1e-4, atol=1e-4)
    assert head.weight.is_contiguous() and head.basis.is_contiguous()
    assert {n for n, _ in head.named_parameters()} == {"weight", "bias"}


def test_head_latents_are_the_fused_step():
    head, basis, mean, sigma = head_and_data()
    with torch.no_grad():
        head.weight.add_(0.1 * torch.randn(D, d))
    h, tau = torch.randn(3, D), torch.tensor([2.0, 0.0, 5.0])
    ref = R.latent_step(h, head.weight, head.bias, basis, mean, tau, sigma=sigma)
    R.assert_matches(head.latents(h, tau), ref)


@pytest.mark.parametrize("whitened", [False, True], ids=["plain", "whitened"])
def test_head_save_load_round_trip(tmp_path, whitened):
    head, *_ = head_and_data(whitened)
    with torch.no_grad():
        head.weight.mul_(1.5)
    path = tmp_path / "head.safetensors"
    head.save(str(path))
    loaded = PCALatentHead.load(str(path))
    for name, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert (loaded.sigma is None) == (not whitened)
    assert os.listdir(tmp_path) == ["head.safetensors"], "no temporary file left behind"


def test_head_save_failure_leaves_no_file(tmp_path, monkeypatch):
    head, *_ = head_and_data()
    path = tmp_path / "head.safetensors"

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(gapkern._io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        head.save(str(path))
    assert os.listdir(tmp_path) == []


def test_head_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no head file"):
        PCALatentHead.load(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    save_file({"basis": torch.eye(4, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a PCALatentHead file"):
        PCALatentHead.load(str(tmp_path / "other.safetensors"))


def test_head_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mean: expected size 8"):
        PCALatentHead(torch.eye(8, 3), torch.zeros(7))
    with pytest.raises(ValueError, match="sigma: expected size 3"):
        PCALatentHead(torch.eye(8, 3), torch.zeros(8), torch.ones(4))
    with pytest.raises(ValueError, match="basis: expected a 2-D tensor"):
        PCALatentHead(torch.ones(8), torch.zeros(8))


@pytest.mark.parametrize("field,value,match", [
    ("latent_budget", 0, "latent_budget: expected at least 1"),
    ("latent_start_id", -1, "latent_start_id: expected a non-negative int"),
    ("calibration", "l2", "calibration: expected one of none, rms, ema"),
    ("ema_decay", 1.0, r"ema_decay: expected a number in \[0, 1\)"),
    ("eps", 0.0, "eps: expected a positive number"),
    ("profile", "x", "profile: expected one of gap, monet"),
])
def test_gap_config_checks_its_fields(field, value, match):
    kw = dict(latent_start_id=1, latent_end_id=2, latent_pad_id=3)
    kw[field] = value
    with pytest.raises(ValueError, match=match):
        GapConfig(**kw)


def test_gap_config_from_tokenizer_and_dict_round_trip():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="tokenizer: has no token '<abs_vis_token>'"):
        GapConfig.from_tokenizer(tok, profile="monet")
    cfg = GapConfig.from_tokenizer(tok, profile="gap", latent_budget=4, calibration="rms")
    assert (cfg.latent_start_id, cfg.latent_end_id, cfg.latent_pad_id) == tuple(
        tok.convert_tokens_to_ids(t) for t in ("<latent>", "</latent>", "<latent_pad>"))
    assert cfg.latent_budget == 4 and cfg.calibration == "rms" and cfg.profile == "gap"
    assert GapConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg
