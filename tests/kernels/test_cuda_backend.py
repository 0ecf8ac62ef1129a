"""The CUDA backend: the build and its skip path, clear errors without a GPU, the kernels
under a host emulation of CUDA (CPU, any machine with g++), and CUDA-graph capture (GPU).

GPU parity of every op is in tests/ops/test_<op>.py (parametrized over backends, gpu-marked).
"""
from __future__ import annotations

import faulthandler
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gapkern import ops
from gapkern.ops import _cache

import reference as R
from cases import PACKED_DATA_EDITS, Case, cuda_graph, reflect

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()


def _load_setup():
    spec = importlib.util.spec_from_file_location("gapkern_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": nothing is built
    return module


setup_py = _load_setup()
BUILD_EXPECTED = setup_py.cuda_build_decision()[0] is not None


def _extension():
    try:
        from gapkern import _C
    except ImportError:
        return None
    return _C


needs_extension = pytest.mark.skipif(_extension() is None, reason="gapkern._C is not built here")


def run_step(backend, hidden, weight, bias, basis, mean, tau, sigma, eps, latent_mask, out):
    """One latent step on a backend module (arguments as gapkern.ops passes them, validated)."""
    backend.prepare_latent_step(weight, bias, basis, mean, tau, sigma, eps, latent_mask, out, _cache.workspace)(hidden)
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")


# -- the build ---------------------------------------------------------------

@pytest.mark.skipif(not BUILD_EXPECTED, reason="no nvcc, or GAPKERN_NO_CUDA=1: the extension is not built")
def test_extension_imports_when_nvcc_is_there():
    """With nvcc on the machine, the install must have built gapkern._C (a compile error fails CI here)."""
    import gapkern._C as C
    from gapkern.ops import _cuda  # refuses an extension of another interface version

    assert C.ABI_VERSION == _cuda.ABI_VERSION
    assert set(_cuda.DTYPE) == {torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64}
    assert issubclass(C.CudaError, RuntimeError)
    driver, runtime = C.cuda_versions()  # no context, no error, GPU or not
    assert runtime >= 12000 and driver >= 0


def test_build_is_skipped_with_one_line_when_disabled():
    lines = []
    assert setup_py.extension_modules({"GAPKERN_NO_CUDA": "1", "PATH": os.environ.get("PATH", "")},
                                      log=lines.append) == []
    assert len(lines) == 1 and "GAPKERN_NO_CUDA=1" in lines[0] and "skipping the CUDA extension" in lines[0]


def test_build_is_skipped_with_one_line_without_nvcc(capsys):
    assert setup_py.extension_modules({"PATH": "", "CUDA_HOME": "/nonexistent"}) == []
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and "nvcc not found" in printed[0]


@pytest.mark.skipif(setup_py.find_nvcc() is None, reason="no nvcc here")
def test_build_is_planned_with_nvcc():
    for value in ("", "0"):
        env = {**os.environ, "GAPKERN_NO_CUDA": value}
        (ext,) = setup_py.extension_modules(env, log=pytest.fail)
        assert ext.name == "gapkern._C" and os.path.basename(ext.nvcc).startswith("nvcc")


# -- without a GPU: clear errors, never a crash -----------------------------------

@cpu_only
def test_backend_info_says_no_gpu():
    status = ops.backend_info()["cuda"]
    if _extension() is None:
        assert status.startswith("not built: ")
    else:
        assert status == "no GPU"


@cpu_only
def test_cuda_backend_on_cpu_tensors_raises_a_clear_error():
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="gapkern backend 'cuda' cannot run on cpu tensors"):
        ops.latent_step(torch.randn(2, 8), tau=1.0)


@needs_extension
def test_adapter_rejects_cpu_tensors():
    from gapkern.ops import _cuda

    c = Case(64, 16, 2, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="gapkern cuda backend: expected CUDA tensors, got one on cpu"):
        run_step(_cuda, c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, None, 1e-6, None, c.out_buffer())
    with pytest.raises(RuntimeError, match="expected CUDA tensors"):
        _cuda.pca_project(c.hidden, c.weight, c.bias)


@cpu_only
@needs_extension
def test_raw_extension_without_a_device_raises():
    C = _extension()
    no_device = r"gapkern cuda backend: no CUDA device \(cuda\w+: "
    with pytest.raises(RuntimeError, match=no_device):
        C.check_device(0)
    with pytest.raises(RuntimeError, match=no_device):
        C.latent_workspace_bytes(0, C.DType.bfloat16, 1, 3584, 629)
    with pytest.raises(RuntimeError, match=no_device):  # raises before touching the (null) pointers
        C.norm_calibrate(C.Launch(0, 0), C.DType.bfloat16, C.Mat(0, 1, 8, 8, 1), C.Vec(), 1e-6, C.Vec(),
                         C.OutMat(0, 1, 8, 8, 1))


def _raw_calls(C):
    """Calls whose views disagree (null pointers: the shapes are checked before any is touched)."""
    launch, f32 = C.Launch(0, 0), C.DType.float32
    hidden, out = C.Mat(0, 2, 8, 8, 1), C.OutMat(0, 2, 4, 4, 1)
    args = C.LatentArgs(hidden, C.Vec(), C.Vec(), C.Vec(), C.Vec(), 1e-6, C.Vec(), C.OutMat(0, 2, 8, 8, 1),
                        C.Workspace(0, 1 << 20))
    return [
        (lambda: C.pca_project(launch, f32, hidden, C.Mat(0, 9, 4, 4, 1), C.Vec(), out),
         r"weight: expected 8 rows \(D, the columns of hidden\), got 9"),
        (lambda: C.pca_project(launch, f32, hidden, C.Mat(0, 8, 4, 4, 1), C.Vec(), C.OutMat(0, 3, 4, 4, 1)),
         r"out: expected 2 rows \(B, the rows of hidden\), got 3"),
        (lambda: C.pca_reconstruct(launch, f32, C.Mat(0, 2, 4, 4, 1), C.Mat(0, 8, 5, 5, 1), C.Vec(), C.Vec(),
                                   C.OutMat(0, 2, 8, 8, 1)), r"basis: expected 4 columns"),
        (lambda: C.norm_calibrate(launch, f32, hidden, C.Vec(), 1e-6, C.Vec(), C.OutMat(0, 2, 7, 7, 1)),
         r"dst: expected 8 columns"),
        (lambda: C.reembed(launch, f32, f32, C.DType.int64, C.Vec(), hidden, C.Vec(), C.Mat(0, 97, 9, 9, 1),
                           C.OutMat(0, 2, 8, 8, 1)), r"embed: expected 8 columns"),
        (lambda: C.latent_step_strided(launch, args, C.Mat(0, 8, 4, 4, 1), C.Mat(0, 8, 3, 3, 1)),
         r"basis: expected 4 columns \(d, the rank of weight\), got 3"),
        (lambda: C.latent_step_packed(launch, C.DType.bfloat16, args, C.Packed(0, 4, 7), C.Packed(0, 8, 4)),
         r"weight: expected 8 rows"),
        (lambda: C.pca_project(launch, f32, C.Mat(0, -1, 8, 8, 1), C.Mat(0, 8, 4, 4, 1), C.Vec(), out),
         r"hidden rows: size -1 is outside"),
    ]


@needs_extension
def test_raw_extension_checks_that_the_shapes_agree():
    C = _extension()
    for call, message in _raw_calls(C):
        with pytest.raises(ValueError, match="gapkern cuda backend: " + message):
            call()
    with pytest.raises(TypeError):  # a dtype is a DType, not a number
        C.pca_project(C.Launch(0, 0), 0, C.Mat(0, 2, 8, 8, 1), C.Mat(0, 8, 4, 4, 1), C.Vec(), C.OutMat(0, 2, 4, 4, 1))


def test_emulated_extension_checks_that_the_shapes_agree(emulated_C):
    """The same checks in the extension built from this tree (the installed one may be older or absent)."""
    for call, message in _raw_calls(emulated_C):
        with pytest.raises(ValueError, match="gapkern cuda backend: " + message):
            call()


# -- the kernels under host emulation (CPU) ------------------------------------

def _cuda_include():
    nvcc = setup_py.find_nvcc()
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(nvcc)))
    for root in filter(None, roots):
        if os.path.isfile(os.path.join(root, "include", "cuda_bf16.h")):
            return os.path.join(root, "include")
    return None


def _build_emulated(out_dir: Path):
    """gapkern._C built from csrc/ and python/ with g++ and GAPKERN_EMULATE (see csrc/emulate/host.h)."""
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 builds the emulated extension")
    cxx, include = shutil.which("g++"), _cuda_include()
    if cxx is None or include is None:
        pytest.skip("the emulated kernels need g++ and the CUDA headers")
    flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-pthread", "-DGAPKERN_EMULATE",
             f"-I{ROOT / 'csrc'}", f"-I{include}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    sources = [*(ROOT / "csrc").glob("*.cu"), ROOT / "csrc/emulate/runtime.cpp", ROOT / "python/bindings.cpp"]

    def compile_one(src):
        obj = out_dir / (src.name + ".o")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        run = subprocess.run([cxx, *flags, *lang, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        if run.returncode:
            pytest.fail(f"emulated build of {src.name} failed:\n{run.stderr[-4000:]}")
        return str(obj)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_one, sources))
    target = out_dir / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    run = subprocess.run([cxx, "-shared", "-pthread", *objects, "-o", str(target)], capture_output=True, text=True)
    if run.returncode:
        pytest.fail(f"linking the emulated extension failed:\n{run.stderr[-4000:]}")
    spec = importlib.util.spec_from_file_location("gapkern_emulated._C", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def emulated_C(tmp_path_factory):
    return _build_emulated(tmp_path_factory.mktemp("emulated_C"))


@pytest.fixture(scope="module")
def emulated_adapter(emulated_C):
    """A copy of gapkern/ops/_cuda.py imported against the emulated extension (whatever gapkern._C
    is installed, or none): it runs the kernels of this tree on CPU tensors."""
    import gapkern

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "gapkern._C", emulated_C)
        mp.setattr(gapkern, "_C", emulated_C, raising=False)
        spec = importlib.util.spec_from_file_location("gapkern.ops._cuda_emulated", ROOT / "gapkern/ops/_cuda.py")
        adapter = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(adapter)
    adapter._on_gpu = lambda *tensors: None
    adapter._launch = lambda t: emulated_C.Launch(0, 0)
    return adapter


def test_the_cuda_adapter_follows_the_backend_protocol(emulated_adapter):
    """gapkern/ops/_cuda.py, imported against the emulated extension: the functions of
    gapkern.ops.backend.Backend in its parameter order (tests/ops/test_backend_protocol.py holds the others)."""
    from gapkern.ops.backend import Backend, protocol_mismatches

    assert protocol_mismatches(emulated_adapter) == []
    assert isinstance(emulated_adapter, Backend)


@pytest.fixture
def emulated(emulated_adapter):
    """The cuda backend's adapter running the emulated kernels, with empty caches."""
    _cache.clear_caches()
    faulthandler.dump_traceback_later(600, exit=True)  # a barrier bug would hang: fail instead
    yield emulated_adapter
    faulthandler.cancel_dump_traceback_later()
    _cache.clear_caches()


EMU_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16"),
              pytest.param(torch.float16, id="f16")]
# (D, d, B): odd sizes; B = 9 and 70 take 2 and 16 row tiles (two row groups of 64 at 70).
EMU_CASES = [pytest.param((200, 37, 1), id="D200-d37-B1"), pytest.param((200, 37, 9), id="D200-d37-B9"),
             pytest.param((96, 40, 70), id="D96-d40-B70")]


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("shape", EMU_CASES)
@pytest.mark.parametrize("whiten", [False, True], ids=["plain", "whitened"])
def test_emulated_latent_step_matches_reference(emulated, dtype, shape, whiten):
    D, d, B = shape
    c = Case(D, d, B, dtype, "cpu")
    sigma = c.sigma if whiten else None
    for _ in range(2):  # the second call reuses the workspace: arrival counters were reset
        out = c.out_buffer()
        run_step(emulated, c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma, 1e-6, c.mask, out)
        ref = R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=sigma)
        R.assert_matches(out[c.mask], ref[c.mask])
        assert (out[~c.mask] == 7.0).all(), "rows outside latent_mask must stay untouched"


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emulated_bound_step_follows_new_inputs_on_one_workspace(emulated, dtype):
    """Bound once (one workspace), called on new hidden states, targets and masks: each call is exact."""
    c = Case(200, 37, 9, dtype, "cpu")
    tau, mask, out = c.tau.clone(), c.mask.clone(), c.out_buffer()
    kernel = emulated.prepare_latent_step(c.weight, c.bias, c.basis, c.mean, tau, c.sigma, 1e-6, mask, out,
                                       _cache.workspace)
    for trial in range(3):
        hidden = (R.f64(c.hidden) * (trial + 1) * (-1) ** trial).to(dtype)
        out.fill_(7.0)
        kernel(hidden)
        ref = R.latent_step(hidden, c.weight, c.bias, c.basis, c.mean, tau, sigma=c.sigma)
        R.assert_matches(out[mask], ref[mask])
        assert (out[~mask] == 7.0).all()
        tau.mul_(0.5)
        mask.copy_(~mask)
    assert [key[0] for key in _cache._workspaces] == ["cuda.latent_step"], "one workspace, taken when bound"


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emulated_latent_step_strided_without_mean_or_tau(emulated, dtype):
    c = Case(200, 37, 3, dtype, "cpu", strided=True)
    buf = c.out_buffer(strided=True)
    run_step(emulated, c.hidden, c.weight, None, c.basis, None, None, c.sigma, 1e-6, None, buf)
    R.assert_matches(buf, R.latent_step(c.hidden, c.weight, None, c.basis, None, None, sigma=c.sigma))
    parent = buf._base
    assert (parent[:, 0] == 7.0).all() and (parent[:, 2] == 7.0).all()


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emulated_identity_head_and_zero_rows(emulated, dtype):
    c = Case(200, 37, 3, dtype, "cpu")
    out = c.out_buffer()
    run_step(emulated, c.hidden, None, None, None, None, c.tau, None, 1e-6, c.mask, out)
    R.assert_matches(out[c.mask], R.latent_step(c.hidden, tau=c.tau)[c.mask])
    assert (out[~c.mask] == 7.0).all()
    zeros = torch.zeros_like(c.hidden)
    zero_mean = torch.zeros_like(c.mean)
    got = c.out_buffer()
    run_step(emulated, zeros, c.weight, None, c.basis, zero_mean, c.tau, c.sigma, 1e-6, None, got)
    assert torch.isfinite(got).all() and (got == 0).all()


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("shape", EMU_CASES)
def test_emulated_pca_project_matches_reference(emulated, dtype, shape):
    """Half types with unit-stride hidden take the tensor-core projection kernel."""
    D, d, B = shape
    c = Case(D, d, B, dtype, "cpu")
    for bias in (c.bias, None):
        R.assert_matches(emulated.pca_project(c.hidden, c.weight, bias), R.project(c.hidden, c.weight, bias))


@pytest.mark.parametrize("dtype", EMU_DTYPES)
def test_emulated_small_ops_match_reference(emulated, dtype):
    c = Case(200, 37, 5, dtype, "cpu", strided=True)
    R.assert_matches(emulated.pca_project(c.hidden, c.weight, c.bias), R.project(c.hidden, c.weight, c.bias))
    coeffs = torch.randn(5, 37).to(dtype)
    R.assert_matches(emulated.pca_reconstruct(coeffs, c.basis, c.mean, c.sigma),
                     R.reconstruct(coeffs, c.basis, c.mean, c.sigma))
    R.assert_matches(emulated.norm_calibrate(c.hidden, c.tau, 1e-6), R.calibrate(c.hidden, c.tau))
    broadcast = torch.tensor([2.5]).expand(5)  # a scalar target: stride 0
    R.assert_matches(emulated.norm_calibrate(c.hidden, broadcast, 1e-6), R.calibrate(c.hidden, 2.5))
    ids = c.token_ids.clone()
    ids[c.mask] = 10 ** 6
    out = c.out_buffer(strided=True)
    emulated.reembed(ids, c.hidden.float(), c.mask, c.embed, out)
    ref = torch.where(c.mask[:, None], R.f64(c.hidden.float()), R.f64(c.embed)[c.token_ids.clamp(max=96)])
    R.assert_matches(out, ref)


def test_emulated_pca_project_keeps_a_bounded_number_of_workspaces(emulated, monkeypatch):
    """One workspace per row count (the tensor-core projection's plan depends on B), least recent dropped."""
    monkeypatch.setattr(_cache, "LIMIT", 3)
    c = Case(96, 40, 65, torch.bfloat16, "cpu")
    for rows in (1, 9, 17, 33, 65):  # 1, 2, 4, 8 row tiles, then two row groups: five plans
        hidden = c.hidden[:rows]
        R.assert_matches(emulated.pca_project(hidden, c.weight, c.bias), R.project(hidden, c.weight, c.bias))
    kept = [key for key in _cache._workspaces if key[0] == "cuda.pca_project"]
    assert len(kept) == 3, kept


def test_emulated_head_cache_follows_its_tensors(emulated):
    """Packed weights are rebuilt after an in-place update and dropped with the tensor."""
    c = Case(96, 40, 2, torch.bfloat16, "cpu")
    weight = c.weight.clone()
    out = c.out_buffer()
    run_step(emulated, c.hidden, weight, c.bias, c.basis, c.mean, c.tau, None, 1e-6, None, out)
    weight.mul_(-0.5)
    run_step(emulated, c.hidden, weight, c.bias, c.basis, c.mean, c.tau, None, 1e-6, None, out)
    R.assert_matches(out, R.latent_step(c.hidden, weight, c.bias, c.basis, c.mean, c.tau))
    assert len(_cache._derived) == 1
    del weight
    assert not _cache._derived


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("scale,eps", [(1e30, 1e-6), (1e-30, 1e-35)], ids=["1e30", "1e-30-tiny-eps"])
def test_emulated_calibration_near_float32_limits(emulated, dtype, scale, eps):
    """No all-zero rows from overflowing squares, no tau / eps rows from underflowing ones."""
    if dtype == torch.float16:
        pytest.skip("float16 holds neither 1e30 nor 1e-30")
    x = (torch.randn(3, 200, dtype=torch.float64).clamp(-3, 3) * scale).to(dtype)
    tau = torch.tensor([2.0, 0.5, 7.0])
    R.assert_matches(emulated.norm_calibrate(x, tau, eps), R.calibrate(x, tau, eps))
    out = torch.zeros_like(x)
    run_step(emulated, x, None, None, None, None, tau, None, eps, None, out)  # the identity head
    R.assert_matches(out, R.calibrate(x, tau, eps))
    c = Case(200, 37, 3, dtype, "cpu")
    hidden = (R.f64(c.hidden) * 1e20).to(dtype)  # a head fed huge hidden states
    for sigma in (None, c.sigma):
        got = c.out_buffer()
        run_step(emulated, hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma, 1e-6, c.mask, got)
        ref = R.latent_step(hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=sigma)
        R.assert_matches(got[c.mask], ref[c.mask])


@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("edit", ["mean.data", "mean-inference", "basis-inference", "basis.data"])
def test_emulated_latent_step_sees_in_place_edits(request, emulated, dtype, edit):
    """Nothing derived from mean is cached; packed copies of basis are not kept for inference tensors."""
    if dtype != torch.float32 and edit == "basis.data":
        request.applymarker(pytest.mark.xfail(strict=True, reason=PACKED_DATA_EDITS))
    inference = edit.endswith("inference")
    with torch.inference_mode(inference):
        c = Case(200, 37, 3, dtype, "cpu")
        c.mean.mul_(20.0)  # basis.T @ mean as large as the coefficients: an edit moves the norms
    for change in (False, True):
        if change:
            with torch.inference_mode(inference):
                if edit.startswith("mean"):
                    (c.mean if inference else c.mean.data).mul_(-3.0)
                else:
                    (c.basis if inference else c.basis.data).copy_(reflect(c.basis, c.mean))
        out = c.out_buffer()
        run_step(emulated, c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, c.sigma, 1e-6, None, out)
        R.assert_matches(out, R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=c.sigma))


def test_emulated_clear_caches_after_data_edits(emulated):
    """The documented remedy for .data writes into a packed weight or basis."""
    c = Case(200, 37, 3, torch.bfloat16, "cpu")
    out = c.out_buffer()
    run_step(emulated, c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, None, 1e-6, None, out)
    c.basis.data.copy_(c.basis.flip(1))
    c.weight.data.mul_(-1.0)
    ops.clear_caches()
    run_step(emulated, c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, None, 1e-6, None, out)
    R.assert_matches(out, R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau))


def test_emulated_ema_update(emulated):
    state = torch.zeros(1)
    emulated.ema_update(state, torch.tensor([2.0, 4.0]), 0.9)
    assert state.item() == pytest.approx(3.0)
    emulated.ema_update(state, torch.tensor([13.0], dtype=torch.bfloat16), 0.9)
    assert state.item() == pytest.approx(0.9 * 3.0 + 0.1 * 13.0, rel=1e-6)


# -- on a GPU ----------------------------------------------------------------------

def _graph_case(dtype, head):
    c = Case(3584, 629, 5, dtype, "cuda")
    weight, bias, basis, mean = (c.weight, c.bias, c.basis, c.mean) if head else (None, None, None, None)
    sigma = c.sigma if head else None
    return c, dict(weight=weight, bias=bias, basis=basis, mean=mean, sigma=sigma)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", EMU_DTYPES)
@pytest.mark.parametrize("head", [True, False], ids=["pca-head", "identity"])
def test_latent_step_in_a_cuda_graph_matches_the_torch_backend(dtype, head):
    """Capture one latent step (cuda backend) in a CUDA graph; replays on fresh inputs match the torch backend."""
    c, kw = _graph_case(dtype, head)
    hidden, tau, out = c.hidden.clone(), c.tau.clone(), c.out_buffer()

    def step(o):
        ops.latent_step(hidden, kw["weight"], kw["bias"], kw["basis"], kw["mean"], tau, sigma=kw["sigma"],
                        latent_mask=c.mask, out=o)

    with ops.use_backend("cuda"):  # warm-ups: workspace and packed head cached, kernels loaded
        graph = cuda_graph(lambda: step(out), warmups=2)
    for trial in range(3):
        hidden.copy_(torch.randn_like(hidden, dtype=torch.float32).to(hidden.dtype) * (trial + 1))
        tau.copy_(torch.rand_like(tau) * 5 + 1)
        out.fill_(7.0)
        graph.replay()
        torch.cuda.synchronize()
        expected = c.out_buffer()
        with ops.use_backend("torch"):
            step(expected)
        ref = R.latent_step(hidden, kw["weight"], kw["bias"], kw["basis"], kw["mean"], tau, sigma=kw["sigma"])
        mask = c.mask.cpu()
        R.assert_matches(out[c.mask], ref[mask])
        R.assert_matches(expected[c.mask], ref[mask])
        assert (out[~c.mask] == 7.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 64, 70, 256])
def test_latent_step_is_deterministic_and_reuses_its_workspace(dtype, B):
    """Repeated calls give bit-identical results (split-K sums in a fixed order, counters reset)."""
    c = Case(3584, 629, B, dtype, "cuda")
    first, again = c.out_buffer(), c.out_buffer()
    with ops.use_backend("cuda"):
        ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=c.sigma, out=first)
        for _ in range(3):
            ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=c.sigma, out=again)
    assert torch.equal(first, again)
    R.assert_matches(first, R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=c.sigma))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
def test_packed_head_is_rebuilt_after_an_in_place_update(backend):
    c = Case(2048, 311, 3, torch.bfloat16, "cuda")
    weight = c.weight.clone()
    out = c.out_buffer()
    ops.latent_step(c.hidden, weight, c.bias, c.basis, c.mean, c.tau, out=out)
    with torch.no_grad():
        weight.mul_(-0.5)
    ops.latent_step(c.hidden, weight, c.bias, c.basis, c.mean, c.tau, out=out)
    R.assert_matches(out, R.latent_step(c.hidden, weight, c.bias, c.basis, c.mean, c.tau))
