import os

import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. It
# must be set before any @triton.jit function is defined, so before gapkern's
# kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import gapkern  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_backend():
    """Whatever a test selects, the next one starts from the same backend."""
    with gapkern.ops.use_backend(gapkern.ops.get_backend()):
        yield


@pytest.fixture
def backend(request):
    """Indirect parametrization: the test runs with backend ``request.param`` selected."""
    with gapkern.ops.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model tests: tiny matmuls gain nothing from threads, and on a busy
    small machine OpenMP threads thrash (20x slower seen here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
