"""Backend dispatch: the selection and its errors, status as data, import failures that are bugs fail
loudly, auto's fallback warns, ``use_backend`` restores, the interpreter flag comes from the kernels themselves."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from gapkern import ops
from gapkern.ops import backend as _backends
from gapkern.ops.backend import State, Status

from cases import Case

HAS_CUDA = torch.cuda.is_available()


def test_backend_status_is_data_and_backend_info_words_it():
    device = "cuda" if HAS_CUDA else "cpu"
    torch_status = ops.backend_status("torch", device)
    assert torch_status == Status(State.READY) and torch_status.ready and str(torch_status) == "ready"
    info = ops.backend_info()
    for name in ("cuda", "triton", "torch"):
        status = ops.backend_status(name, device)
        assert isinstance(status.state, State)
        assert info[name] == str(status)
        assert status.ready == (status.state is State.READY)
    if not HAS_CUDA:
        assert ops.backend_status("cuda", "cpu").state in (State.NOT_BUILT, State.NO_GPU)
        assert ops.backend_status("triton", "cpu") == Status(State.READY, "interpreter, CPU tensors")
    with pytest.raises(ValueError, match="auto is a choice among them"):
        ops.backend_status("auto")


@pytest.fixture
def fake_triton(tmp_path, monkeypatch):
    """fake_triton(source): the triton backend is loaded from a module with this source."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_backends, "_loaded", {k: v for k, v in _backends._loaded.items() if k != "triton"})
    monkeypatch.setattr(_backends, "_resolved", {})
    monkeypatch.setitem(_backends.IMPORTS, "triton", lambda: importlib.import_module("gapkern_fake_triton"))
    monkeypatch.delitem(sys.modules, "gapkern_fake_triton", raising=False)

    def install(source):
        (tmp_path / "gapkern_fake_triton.py").write_text(source)
    return install


def test_a_missing_backend_is_not_installed_and_its_import_error_is_chained(fake_triton):
    fake_triton("raise ImportError('no triton here')\n")
    status = ops.backend_status("triton", "cuda")
    assert status.state is State.NOT_INSTALLED and isinstance(status.error, ImportError)
    assert str(status) == "not installed: ImportError: no triton here"
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="not installed: ImportError") as err:
        ops.latent_step(torch.ones(2, 8))
    assert err.value.__cause__ is status.error


def test_a_backend_that_fails_to_import_for_another_reason_raises(fake_triton):
    """A bug in a backend is never reported as 'not installed' while auto quietly runs the reference."""
    fake_triton("1 / 0\n")
    with pytest.raises(ZeroDivisionError):
        ops.backend_status("triton", "cuda")
    with pytest.raises(ZeroDivisionError):
        ops.backend_info()
    if not HAS_CUDA or ops.backend_status("cuda", "cuda").ready is False:
        with ops.use_backend("auto"), pytest.raises(ZeroDivisionError):
            ops.module_for(torch.device("cuda"))


def test_auto_warns_once_when_it_falls_back_to_the_reference_on_cuda_tensors(monkeypatch):
    monkeypatch.setattr(_backends, "_resolved", {})
    unbuilt = Status(State.NOT_BUILT, "ImportError: gapkern._C", ImportError("gapkern._C"))
    monkeypatch.setattr(_backends, "backend_status", lambda name, device="cuda": unbuilt)
    with ops.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match=r"no GPU backend can run here \(cuda: not built: .*torch reference"):
            assert ops.module_for(torch.device("cuda")).__name__ == "gapkern.ops._torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ops.module_for(torch.device("cuda")).__name__ == "gapkern.ops._torch"
            assert ops.module_for(torch.device("cpu")).__name__ == "gapkern.ops._torch"  # CPU: no warning


def test_use_backend_restores_the_previous_selection_also_on_error():
    with ops.use_backend("torch"):
        with ops.use_backend("triton"):
            assert ops.get_backend() == "triton"
        assert ops.get_backend() == "torch"
        with pytest.raises(ZeroDivisionError), ops.use_backend("auto"):
            assert ops.get_backend() == "auto"
            1 / 0
        assert ops.get_backend() == "torch"
        with pytest.raises(ValueError, match="backend: expected one of"), ops.use_backend("tpu"):
            pass
        assert ops.get_backend() == "torch"


def test_the_selection_is_resolved_once_per_device_type(monkeypatch):
    """The per-call lookup is a dict hit: no status is computed again for the same selection."""
    monkeypatch.setattr(_backends, "_resolved", {})
    calls = []
    real = _backends.backend_status
    monkeypatch.setattr(_backends, "backend_status", lambda *a: calls.append(a) or real(*a))
    with ops.use_backend("triton"):
        for _ in range(3):
            ops.latent_step(torch.ones(2, 8), tau=1.0)
    assert len(calls) == 1


STATUS_AFTER_FLIPPING = """
import os
import gapkern
from gapkern import ops
before = ops.backend_status("triton", "cpu").state.name
os.environ["TRITON_INTERPRET"] = "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1"
print(before, ops.backend_status("triton", "cpu").state.name)
"""


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter question is about CPU tensors")
@pytest.mark.parametrize("interpret", ["1", None], ids=["interpreted", "compiled"])
def test_triton_status_follows_how_the_kernels_were_built_not_the_environment_later(interpret):
    """TRITON_INTERPRET counts when the kernels are defined (Triton reads it then); changing it later
    changes neither the kernels nor what gapkern reports about them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = interpret
    run = subprocess.run([sys.executable, "-c", STATUS_AFTER_FLIPPING], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = "READY" if interpret else "NO_GPU"
    assert run.stdout.split() == [expected, expected]


# -- bad input (gathered from tests/test_ops_api.py) ----------------------------------------------

def bad_set_backend_calls():
    return [
        ("backend", lambda: ops.set_backend("tpu"), ValueError, r"backend: expected one of auto, cuda, triton, torch"),
    ]


@pytest.mark.parametrize("name,call,exc,match", bad_set_backend_calls(), ids=[c[0] for c in bad_set_backend_calls()])
def test_bad_set_backend_input_names_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# -- the selection (gathered from tests/test_ops_api.py) ----------------------------------------

def test_auto_never_picks_a_backend_that_cannot_run_here():
    info = ops.backend_info()
    assert set(info) == {"cuda", "triton", "torch"} and info["torch"] == "ready"
    with ops.use_backend("auto"):
        assert ops.module_for(torch.device("cpu")).__name__ == "gapkern.ops._torch"
    if not torch.cuda.is_available():
        assert info["cuda"] != "ready" and not info["triton"] == "ready"


def test_explicit_backend_that_cannot_run_raises():
    if torch.cuda.is_available():
        pytest.skip("every backend can run on a GPU machine")
    c = Case(40, 7, 3, torch.float32, "cpu")
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="gapkern backend 'cuda' cannot run on cpu tensors"):
        ops.latent_step(c.hidden)
    with ops.use_backend("triton"), pytest.raises(TypeError, match="float64 runs on the torch backend only"):
        ops.latent_step(c.hidden.double())


def test_backend_env_variable_selects_backend():
    code = "import gapkern; print(gapkern.ops.get_backend())"
    env = dict(os.environ, GAPKERN_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["GAPKERN_BACKEND"] = "nope"
    bad = subprocess.run([sys.executable, "-c", "import gapkern, torch; gapkern.ops.latent_step(torch.ones(1, 2))"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "backend: expected one of" in bad.stderr
