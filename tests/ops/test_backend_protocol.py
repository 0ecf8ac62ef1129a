"""Every backend module provides the functions of gapkern.ops.backend.Backend, with the protocol's
parameter names in the protocol's order (the public op's order, gapkern/ops/step.py)."""
from __future__ import annotations

import importlib
import inspect
import types

import pytest

from gapkern.ops.backend import IMPORTS, OPS, Backend
from gapkern.ops.backend import protocol_mismatches as mismatches


def protocol_parameters(name: str) -> list[str]:
    return [p for p in inspect.signature(getattr(Backend, name)).parameters if p != "self"]


def test_the_protocol_is_the_ops_and_the_step_takes_the_public_order():
    members = [n for n, v in vars(Backend).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert sorted(members) == sorted(OPS)
    from gapkern import ops

    public = [p for p in inspect.signature(ops.latent_step).parameters if p != "hidden"]
    assert protocol_parameters("prepare_latent_step") == public[:-1] + ["out", "workspace"]
    assert list(inspect.signature(ops.bind_latent_step).parameters) == public


@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_every_backend_module_follows_the_protocol(name):
    try:
        module = IMPORTS[name]()
    except ImportError as exc:  # the cuda extension unbuilt: its adapter is held in tests/kernels/test_cuda_backend.py
        pytest.skip(f"backend {name} does not import here: {exc}")
    assert mismatches(module) == []
    assert isinstance(module, Backend)


def test_the_check_catches_a_missing_function_and_a_wrong_order():
    good = importlib.import_module("gapkern.ops._torch")
    broken = types.ModuleType("broken")
    for name in OPS[:-1]:
        setattr(broken, name, getattr(good, name))
    assert mismatches(broken) == ["prepare_latent_step: missing"]
    assert not isinstance(broken, Backend)

    def prepare_latent_step(weight, bias, basis, mean, sigma, tau, eps, latent_mask, out, workspace):
        """The order the step had before: sigma before tau."""
    broken.prepare_latent_step = prepare_latent_step
    assert mismatches(broken) == ["prepare_latent_step: parameters (weight, bias, basis, mean, sigma, tau, eps, "
                                  "latent_mask, out, workspace), the protocol's are (weight, bias, basis, mean, tau, "
                                  "sigma, eps, latent_mask, out, workspace)"]


def test_a_backend_off_the_protocol_fails_loudly_when_loaded(monkeypatch):
    """A backend that lost a function is a bug: loading it raises, it is never 'not installed'."""
    from gapkern.ops import backend

    monkeypatch.setattr(backend, "_loaded", {k: v for k, v in backend._loaded.items() if k != "triton"})
    monkeypatch.setattr(backend, "_resolved", {})
    monkeypatch.setitem(backend.IMPORTS, "triton", lambda: types.ModuleType("gapkern_half_triton"))
    with pytest.raises(TypeError, match=r"'triton' \(gapkern_half_triton\) does not follow .*pca_project: missing"):
        backend.backend_status("triton", "cuda")
