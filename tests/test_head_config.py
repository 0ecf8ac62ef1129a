"""PCALatentHead and GapConfig: the head's PCA start, its file round trip, the config's checks."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import gapkern
from gapkern import GapConfig, PCALatentHead
from gapkern.testing import tiny_tokenizer

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


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    head, *_ = head_and_data()
    before = os.umask(0o022)
    try:
        head.save(str(tmp_path / "head.safetensors"))
    finally:
        os.umask(before)
    assert (tmp_path / "head.safetensors").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


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


def test_folder_write_failure_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """atomic_folder: a failed write, and a failed move half-way, both leave the old files."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("old config")
    (folder / "model.safetensors").write_text("old weights")

    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("new config")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        gapkern._io.atomic_folder(str(folder), write)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "no temporary folder left behind"
    assert (folder / "config.json").read_text() == "old config"

    def write_both(tmp):
        for name in ("config.json", "model.safetensors"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("new " + name)

    moves, real_replace = [], os.replace

    def replace_failing_on_the_last_move(src, dst):
        moves.append(dst)
        if len(moves) == 4:  # set aside config, move it in, set aside the weights, then fail
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(gapkern._io.os, "replace", replace_failing_on_the_last_move)
    with pytest.raises(OSError, match="rename failed"):
        gapkern._io.atomic_folder(str(folder), write_both)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert {p.name: p.read_text() for p in folder.iterdir()} == {
        "config.json": "old config", "model.safetensors": "old weights"}
    gapkern._io.atomic_folder(str(folder), write_both)
    assert {p.name: p.read_text() for p in folder.iterdir()} == {
        "config.json": "new config.json", "model.safetensors": "new model.safetensors"}

    with pytest.raises(OSError, match="disk full"):  # a new folder is not created by a failed write
        gapkern._io.atomic_folder(str(tmp_path / "new"), write)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    gapkern._io.atomic_folder(str(tmp_path / "new"), write_both)
    os.makedirs(tmp_path / "plain")
    assert os.stat(tmp_path / "new").st_mode == os.stat(tmp_path / "plain").st_mode, "not mkdtemp's private mode"


def test_head_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no head file"):
        PCALatentHead.load(str(tmp_path / "missing.safetensors"))
    save_file({"basis": torch.eye(4, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a PCALatentHead file"):
        PCALatentHead.load(str(tmp_path / "other.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_head_load_of_a_damaged_file_names_the_file(tmp_path, damage):
    head, *_ = head_and_data()
    path = tmp_path / "head.safetensors"
    head.save(str(path))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-16], "garbage": b"not a safetensors file at all", "empty": b""}[damage])
    with pytest.raises(ValueError, match="is not a readable safetensors file") as err:
        PCALatentHead.load(str(path))
    assert str(path) in str(err.value)


# (what to change in a saved head's tensors, the error type, words the message must hold)
BAD_FILES = {
    "bias-broadcasts": (lambda t: t.update(bias=t["bias"][:1]), ValueError, ["'bias'", "expected shape (6,)"]),
    "weight-int32": (lambda t: t.update(weight=t["weight"].to(torch.int32)), TypeError, ["'weight'", "int32"]),
    "weight-transposed": (lambda t: t.update(weight=t["weight"].T.contiguous()), ValueError, ["'weight'", "(48, 6)"]),
    "mean-short": (lambda t: t.update(mean=t["mean"][:-1]), ValueError, ["'mean'", "(48,)"]),
    "sigma-float16": (lambda t: t.update(sigma=t["sigma"].half()), TypeError, ["'sigma'", "float16"]),
    "bias-2d": (lambda t: t.update(bias=t["bias"][None]), ValueError, ["'bias'", "1-D"]),
    "sigma-zero": (lambda t: t["sigma"].__setitem__(2, 0.0), ValueError, ["sigma", "positive"]),
    "weight-nan": (lambda t: t["weight"].__setitem__((0, 0), float("nan")), ValueError, ["weight", "finite"]),
    "extra-tensor": (lambda t: t.update(scale=torch.ones(6)), ValueError, ["unexpected", "'scale'"]),
    "sigma-dropped": (lambda t: t.pop("sigma"), ValueError, ["whitened=True", "'sigma'"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_head_load_checks_every_tensor_and_names_it_and_the_file(tmp_path, case):
    edit, error, words = BAD_FILES[case]
    head, *_ = head_and_data()
    path = tmp_path / "head.safetensors"
    head.save(str(path))
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"gapkern": '{"whitened": true}'})
    with pytest.raises(error) as err:
        PCALatentHead.load(str(path))
    for word in [str(path), *words]:
        assert word in str(err.value), (word, str(err.value))


def test_head_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mean: expected size 8"):
        PCALatentHead(torch.eye(8, 3), torch.zeros(7))
    with pytest.raises(ValueError, match="sigma: expected size 3"):
        PCALatentHead(torch.eye(8, 3), torch.zeros(8), torch.ones(4))
    with pytest.raises(ValueError, match="basis: expected a 2-D tensor"):
        PCALatentHead(torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"basis: expected shape \(D, d\) with 1 <= d <= D"):
        PCALatentHead(torch.eye(8, 0), torch.zeros(8))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_head_rejects_sigma_that_is_not_positive_and_finite(value):
    """sigma divides the weight and bias: a zero gave inf weights and NaN latents."""
    sigma = torch.ones(3)
    sigma[1] = value
    with pytest.raises(ValueError, match="sigma: expected (positive|finite) values"):
        PCALatentHead(torch.eye(8, 3), torch.zeros(8), sigma)


@pytest.mark.parametrize("name", ["basis", "mean"])
def test_head_rejects_non_finite_basis_or_mean(name):
    tensors = {"basis": torch.eye(8, 3), "mean": torch.zeros(8)}
    tensors[name].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"{name}: expected finite values"):
        PCALatentHead(tensors["basis"], tensors["mean"])


@pytest.mark.parametrize("field,value,match", [
    ("latent_budget", 0, "latent_budget: expected at least 1"),
    ("latent_start_id", -1, "latent_start_id: expected a non-negative int"),
    ("latent_pad_id", 1, "expected three different ids, got 1, 2, 1"),
    ("calibration", "l2", "calibration: expected one of none, rms, ema"),
    ("ema_decay", 1.0, r"ema_decay: expected a number in \[0, 1\)"),
    ("ema_decay", float("nan"), r"ema_decay: expected a number in \[0, 1\)"),
    ("eps", 0.0, "eps: expected a positive finite number"),
    ("eps", float("inf"), "eps: expected a positive finite number"),
    ("profile", "x", "profile: expected one of gap, monet"),
    ("span_layout", "vllm", "span_layout: expected one of gap, monet"),
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
    assert GapConfig.from_dict(cfg.to_dict()) == cfg


IDS = dict(latent_start_id=1, latent_end_id=2, latent_pad_id=3)


@pytest.mark.parametrize("profile,layout,budget", [("gap", "gap", 16), ("monet", "monet", 10)])
def test_gap_config_takes_the_profiles_span_layout_and_k(profile, layout, budget):
    """SPEC section 3's table; a config saved before span_layout existed (no key) loads with the default."""
    cfg = GapConfig(**IDS, profile=profile)
    assert (cfg.span_layout, cfg.latent_budget) == (layout, budget)
    old = {k: v for k, v in cfg.to_dict().items() if k != "span_layout"}
    assert GapConfig.from_dict(old) == cfg
    other = {"gap": "monet", "monet": "gap"}[layout]
    mixed = GapConfig(**IDS, profile=profile, span_layout=other, latent_budget=3)
    assert (mixed.span_layout, mixed.latent_budget) == (other, 3)
    assert GapConfig.from_dict(mixed.to_dict()) == mixed


@pytest.mark.parametrize("field,value,expected", [
    ("latent_start_id", True, "an int"), ("latent_end_id", 2.0, "an int"), ("latent_pad_id", "3", "an int"),
    ("latent_budget", 4.0, "an int"), ("latent_budget", False, "an int"),
    ("calibration", 1, "a string"), ("calibration", None, "a string"), ("profile", ["gap"], "a string"),
    ("span_layout", 1, "a string"),
    ("ema_decay", "0.9", "a number"), ("ema_decay", True, "a number"), ("eps", None, "a number"),
])
def test_gap_config_checks_every_field_type_by_name(field, value, expected):
    with pytest.raises(TypeError, match=f"^{field}: expected {expected}, got {type(value).__name__}"):
        GapConfig(**{**IDS, field: value})
    with pytest.raises(TypeError, match=f"^{field}: expected {expected}"):
        GapConfig.from_dict({**IDS, field: value})


def test_gap_config_floats_accept_ints():
    cfg = GapConfig(**IDS, ema_decay=0, eps=1)
    assert cfg.ema_decay == 0.0 and isinstance(cfg.ema_decay, float) and isinstance(cfg.eps, float)


def test_gap_config_from_dict_refuses_unknown_keys_and_non_dicts():
    """A misspelt key was dropped silently: {"latent_budjet": 4} gave latent_budget 16."""
    with pytest.raises(ValueError, match="unknown GapConfig field 'latent_budjet' \\(did you mean 'latent_budget'\\?\\)"):
        GapConfig.from_dict({**IDS, "latent_budjet": 4})
    with pytest.raises(ValueError, match="unknown GapConfig field 'zzz'; the fields are latent_start_id"):
        GapConfig.from_dict({**IDS, "zzz": 4})
    with pytest.raises(TypeError, match="data: expected a dict of GapConfig fields, got NoneType"):
        GapConfig.from_dict(None)
    with pytest.raises(ValueError, match="data: missing GapConfig field\\(s\\) latent_end_id, latent_pad_id"):
        GapConfig.from_dict({"latent_start_id": 1})


def test_gap_config_is_frozen_and_replace_checks_again():
    """A field changed in place reached generate unchecked (latent_budget -3: pads forever)."""
    cfg = GapConfig(**IDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.latent_budget = -3
    assert cfg.latent_budget == 16
    assert dataclasses.replace(cfg, latent_budget=4).latent_budget == 4
    with pytest.raises(ValueError, match="latent_budget: expected at least 1"):
        dataclasses.replace(cfg, latent_budget=-3)
