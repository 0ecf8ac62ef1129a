"""CUDA backend: the functions of :class:`gapkern.ops.backend.Backend` on the extension ``gapkern._C``.

The extension is torch-free: this adapter hands it typed views of the tensors (``_C.Mat``,
``_C.OutMat``, ``_C.Vec``: data pointer, shape, strides in elements), the ``_C.DType`` of the
storage and the current CUDA stream. Arguments arrive checked (each op's file in gapkern/ops/); the
only check here is that tensors are on a GPU (the extension checks that the shapes agree).

Kept between calls (gapkern/ops/_cache.py), so that a decode step allocates
nothing and can be captured in a CUDA graph: the workspace per (device, dtype,
B, D, d); and per head, ``weight.T`` and ``basis`` prepacked in tensor-core
fragment order, rebuilt when a source tensor is modified in place (version
counter), moved, or freed, and packed on every call for tensors without a
version counter (made under ``torch.inference_mode``). Edits through ``.data``
cannot be seen: call ``gapkern.ops.clear_caches()`` after them. Warm up once
before capturing. Calls of the same sizes on different streams at the same
time would share a workspace: keep them on one stream.

Half types run on tensor cores (latent_step, and pca_project up to 1024 rows
with unit-stride hidden); float32, and the strided or large products of
training, run on the CUDA-core GEMM.
"""
from __future__ import annotations

import torch

from gapkern import _C

from . import _cache

ABI_VERSION = 4  # the interface of csrc/gapkern.h this adapter speaks (kAbiVersion there)
if getattr(_C, "ABI_VERSION", None) != ABI_VERSION:
    raise ImportError(f"gapkern._C has interface version {getattr(_C, 'ABI_VERSION', None)}, this gapkern "
                      f"needs {ABI_VERSION}: it was built from another gapkern version; rebuild it (pip install -e .)")


def _check_driver():
    """A GPU whose driver is older than the CUDA this extension was built with cannot run it."""
    driver, runtime = _C.cuda_versions()
    if torch.cuda.is_available() and driver // 1000 < runtime // 1000:
        def version(v):
            return f"{v // 1000}.{v % 1000 // 10}"
        raise ImportError(f"gapkern._C is built with CUDA {version(runtime)} but the driver supports CUDA "
                          f"{version(driver)}: update the driver, or rebuild with an older CUDA toolkit")


_check_driver()

DTYPE = {getattr(torch, name): code for name, code in _C.DType.__members__.items()}  # torch dtype -> _C.DType
_F32 = _C.DType.float32


def _on_gpu(*tensors):
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise RuntimeError(
                f"gapkern cuda backend: expected CUDA tensors, got one on {t.device}; move the inputs "
                "to a GPU or choose another backend with gapkern.ops.set_backend('torch')")


def _launch(t):
    """Where ``t``'s kernels run: its device and the current stream on it."""
    return _C.Launch(t.device.index, torch.cuda.current_stream(t.device).cuda_stream)


def _mat(t):
    return _C.Mat(t.data_ptr(), *t.shape, *t.stride())


def _out(t):
    return _C.OutMat(t.data_ptr(), *t.shape, *t.stride())


def _vec(t):
    return _C.Vec() if t is None else _C.Vec(t.data_ptr(), t.stride(0))


def _pack_a(a):
    """An (M, K) matrix as mma.m16n8k16 A fragments: [M/16][K/16][32 lanes][8], zero-padded.

    Lane (g, t) of tile (i, j) holds rows 16i + g (+8), columns 16j + 2t (+1, +8, +9): one
    16-byte load per lane per tile, the layout csrc/latent_mma.cu reads.
    """
    M, K = a.shape
    mt, kt = -(-M // 16), -(-K // 16)
    p = a.new_zeros(mt * 16, kt * 16)
    p[:M, :K] = a
    return p.view(mt, 2, 8, kt, 2, 4, 2).permute(0, 3, 2, 5, 4, 1, 6).contiguous()


def _packed(a):
    """(the packed tensor, its _C.Packed view): the tensor must live until the launch is enqueued."""
    packed = _pack_a(a.detach())
    return packed, _C.Packed(packed.data_ptr(), *a.shape)


def _workspace(kind, workspace, launch, device, code, rows, dim, rank):
    """(the zero-initialised workspace of ``kind`` (latent_step / pca_project) for these sizes on
    ``device``, its _C.Workspace view): the buffer must live until the launch is enqueued."""
    size = _C.latent_workspace_bytes if kind == "latent_step" else _C.project_workspace_bytes
    nbytes = size(launch.device, code, rows, dim, rank)
    buf = workspace(f"cuda.{kind}", (nbytes,), device, dtype=torch.uint8, zeroed=True)
    return buf, _C.Workspace(buf.data_ptr(), nbytes)


_PACKED_PROJECT_ROWS = 1024


def pca_project(hidden, weight, bias):
    _on_gpu(hidden, weight, bias)
    (rows, dim), rank = hidden.shape, weight.shape[1]
    out = hidden.new_empty(rows, rank)
    code, launch = DTYPE[hidden.dtype], _launch(hidden)
    if code != _F32 and hidden.stride(1) == 1 and rows <= _PACKED_PROJECT_ROWS:
        w_buf, w_t = _cache.derived("cuda.weight.T", lambda: _packed(weight.T), weight)
        buf, ws = _workspace("pca_project", _cache.workspace, launch, hidden.device, code, rows, dim, rank)
        _C.pca_project_packed(launch, code, _mat(hidden), w_t, _vec(bias), _out(out), ws)
    else:  # float32, and the strided or large products of training: the CUDA-core GEMM
        _C.pca_project(launch, code, _mat(hidden), _mat(weight), _vec(bias), _out(out))
    return out


def pca_reconstruct(coeffs, basis, mean, sigma):
    _on_gpu(coeffs, basis, mean, sigma)
    out = basis.new_empty(coeffs.shape[0], basis.shape[0])
    _C.pca_reconstruct(_launch(coeffs), DTYPE[basis.dtype], _mat(coeffs), _mat(basis), _vec(mean), _vec(sigma),
                       _out(out))
    return out


def norm_calibrate(latents, tau, eps):
    _on_gpu(latents, tau)
    out = torch.empty_like(latents)
    _C.norm_calibrate(_launch(latents), DTYPE[latents.dtype], _mat(latents), _vec(tau), eps, _C.Vec(), _out(out))
    return out


def ema_update(tau_state, observed, decay):
    _on_gpu(tau_state, observed)
    _C.ema_update(_launch(tau_state), DTYPE[observed.dtype], observed.shape[0], tau_state.data_ptr(), _vec(observed),
                  decay)


def reembed(token_ids, latents, latent_mask, embed_weight, out):
    _on_gpu(token_ids, latents, latent_mask, embed_weight, out)
    _C.reembed(_launch(out), DTYPE[out.dtype], DTYPE[latents.dtype], DTYPE[token_ids.dtype], _vec(token_ids),
               _mat(latents), _vec(latent_mask), _mat(embed_weight), _out(out))


def _packed_head(weight, basis):
    """(weight.T packed, basis packed), each (tensor, _C.Packed view)."""
    return _cache.derived("cuda.head", lambda: (_packed(weight.T), _packed(basis)), weight, basis)


class _LatentKernel:
    """``kernel(hidden)`` of :func:`prepare_latent_step`. The workspace and its size are taken once, when
    bound; the views of the tensors are made at every call (a moved or replaced tensor is followed,
    never a stale pointer)."""

    def __init__(self, weight, bias, basis, mean, tau, sigma, eps, latent_mask, out, workspace):
        _on_gpu(weight, bias, basis, mean, sigma, tau, latent_mask, out)
        self.head = (weight, bias, basis, mean, sigma)
        self.tau, self.eps, self.latent_mask, self.out = tau, eps, latent_mask, out
        self.code = DTYPE[out.dtype]
        if weight is not None:
            (rows, dim), rank = out.shape, weight.shape[1]
            self.buffer, self.workspace = _workspace("latent_step", workspace, _launch(out), out.device, self.code,
                                                     rows, dim, rank)
        # The packed head the last launch read, kept until the next call: a graph captured from a
        # launch keeps valid memory even if an edit of weight or basis repacks them meanwhile.
        self.packed = None

    def __call__(self, hidden):
        launch, code, (weight, bias, basis, mean, sigma) = _launch(hidden), self.code, self.head
        tau, mask, out = _vec(self.tau), _vec(self.latent_mask), _out(self.out)
        if weight is None:  # identity head: calibrate (or copy) hidden into the masked rows
            _C.norm_calibrate(launch, code, _mat(hidden), tau, self.eps, mask, out)
            return
        args = _C.LatentArgs(_mat(hidden), _vec(bias), _vec(sigma), _vec(mean), tau, self.eps, mask, out,
                             self.workspace)
        if code == _F32:
            _C.latent_step_strided(launch, args, _mat(weight), _mat(basis))
            return
        self.packed = _packed_head(weight, basis)
        (_, w_t), (_, u) = self.packed
        _C.latent_step_packed(launch, code, args, w_t, u)


prepare_latent_step = _LatentKernel
