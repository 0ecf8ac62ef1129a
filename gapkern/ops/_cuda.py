"""CUDA backend: the six protocol functions of ``_torch.py`` on the extension ``gapkern._C``.

The extension is torch-free: this adapter hands it data pointers, strides in
elements, dtype codes and the current CUDA stream. Arguments arrive validated
(``gapkern/ops/__init__.py``); the only check here is that tensors are on a GPU.

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

if getattr(_C, "ABI_VERSION", None) != 2:
    raise ImportError("gapkern._C was built from another gapkern version: rebuild it (pip install -e .)")


def _check_driver():
    """A GPU whose driver is older than the CUDA this extension was built with cannot run it."""
    driver, runtime = _C.cuda_versions()
    if torch.cuda.is_available() and driver // 1000 < runtime // 1000:
        def version(v):
            return f"{v // 1000}.{v % 1000 // 10}"
        raise ImportError(f"gapkern._C is built with CUDA {version(runtime)} but the driver supports CUDA "
                          f"{version(driver)}: update the driver, or rebuild with an older CUDA toolkit")


_check_driver()

_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int32: 3, torch.int64: 4}
_F32 = 0


def _on_gpu(*tensors):
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise RuntimeError(
                f"gapkern cuda backend: expected CUDA tensors, got one on {t.device}; move the inputs "
                "to a GPU or choose another backend with gapkern.ops.set_backend('torch')")


def _launch(t):
    """(device index, handle of the current stream on it)."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def _m(t):
    return (t.data_ptr(), t.stride(0), t.stride(1)) if t is not None else (0, 0, 0)


def _v(t):
    return (t.data_ptr(), t.stride(0)) if t is not None else (0, 0)


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


def _workspace(kind, device, index, dtype_code, rows, dim, rank):
    """The zero-initialised workspace of ``kind`` (latent_step / pca_project) for these sizes on ``device``."""
    size = _C.latent_workspace_bytes if kind == "latent_step" else _C.project_workspace_bytes
    nbytes = size(index, dtype_code, rows, dim, rank)
    return _cache.workspace(f"cuda.{kind}", (nbytes,), device, dtype=torch.uint8, zeroed=True)


_PACKED_PROJECT_ROWS = 1024


def pca_project(hidden, weight, bias):
    _on_gpu(hidden, weight, bias)
    (rows, dim), rank = hidden.shape, weight.shape[1]
    out = hidden.new_empty(rows, rank)
    code = _DTYPE[hidden.dtype]
    launch = _launch(hidden)
    if code != _F32 and hidden.stride(1) == 1 and rows <= _PACKED_PROJECT_ROWS:
        w_packed = _cache.derived("cuda.weight.T", lambda: _pack_a(weight.detach().T), weight)
        ws = _workspace("pca_project", hidden.device, launch[0], code, rows, dim, rank)
        _C.pca_project_packed(*launch, code, rows, dim, rank, *_m(hidden), w_packed.data_ptr(), *_v(bias),
                              *_m(out), ws.data_ptr(), ws.numel())
    else:  # float32, and the strided or large products of training: the CUDA-core GEMM
        _C.pca_project(*launch, code, rows, dim, rank, *_m(hidden), *_m(weight), *_v(bias), *_m(out))
    return out


def pca_reconstruct(coeffs, basis, mean, sigma):
    _on_gpu(coeffs, basis, mean, sigma)
    rows, (dim, rank) = coeffs.shape[0], basis.shape
    out = basis.new_empty(rows, dim)
    _C.pca_reconstruct(*_launch(coeffs), _DTYPE[basis.dtype], rows, dim, rank,
                       *_m(coeffs), *_m(basis), *_v(mean), *_v(sigma), *_m(out))
    return out


def norm_calibrate(latents, tau, eps):
    _on_gpu(latents, tau)
    out = torch.empty_like(latents)
    rows, dim = latents.shape
    _C.norm_calibrate(*_launch(latents), _DTYPE[latents.dtype], rows, dim, *_m(latents), *_v(tau), eps,
                      0, 0, *_m(out))
    return out


def ema_update(tau_state, observed, decay):
    _on_gpu(tau_state, observed)
    _C.ema_update(*_launch(tau_state), _DTYPE[observed.dtype], observed.shape[0], tau_state.data_ptr(),
                  *_v(observed), decay)


def reembed(token_ids, latents, latent_mask, embed_weight, out):
    _on_gpu(token_ids, latents, latent_mask, embed_weight, out)
    rows, dim = out.shape
    _C.reembed(*_launch(out), _DTYPE[out.dtype], _DTYPE[latents.dtype], _DTYPE[token_ids.dtype], rows, dim,
               embed_weight.shape[0], *_v(token_ids), *_m(latents), *_v(latent_mask), *_m(embed_weight), *_m(out))


def _packed_head(weight, basis):
    """(weight.T packed, basis packed): hold them until the launch is enqueued (they may be fresh)."""
    return _cache.derived("cuda.head", lambda: (_pack_a(weight.detach().T), _pack_a(basis.detach())), weight, basis)


def latent_step(hidden, weight, bias, basis, mean, sigma, tau, eps, latent_mask, out):
    _on_gpu(hidden, weight, bias, basis, mean, sigma, tau, latent_mask, out)
    rows, dim = hidden.shape
    code = _DTYPE[hidden.dtype]
    launch = _launch(hidden)
    if weight is None:  # identity head: calibrate (or copy) hidden into the masked rows
        _C.norm_calibrate(*launch, code, rows, dim, *_m(hidden), *_v(tau), eps, *_v(latent_mask), *_m(out))
        return
    rank = weight.shape[1]
    ws = _workspace("latent_step", hidden.device, launch[0], code, rows, dim, rank)
    tail = (*_v(bias), *_v(sigma), *_v(mean), *_v(tau), eps, *_v(latent_mask), *_m(out), ws.data_ptr(), ws.numel())
    if code != _F32:
        w_packed, u_packed = _packed_head(weight, basis)
        _C.latent_step_packed(*launch, code, rows, dim, rank, *_m(hidden), w_packed.data_ptr(), u_packed.data_ptr(),
                              *tail)
    else:
        _C.latent_step_strided(*launch, code, rows, dim, rank, *_m(hidden), *_m(weight), *_m(basis), *tail)
