"""Compile every Triton kernel variant the launchers would launch at GPU shapes, for sm_80
and sm_90, without a GPU: the compiled (non-interpreter) path is otherwise never built on CPU.

Run as a script in a process WITHOUT ``TRITON_INTERPRET`` (test_triton_compile.py does).
Launches are recorded instead of run (``JITFunction.run`` is replaced), then each distinct
(kernel, signature, constexprs, options) is compiled ahead of time with ``triton.compile``.
Prints one line per compiled variant and exits non-zero on the first compile error.
"""
from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from gapkern import triton_kernels as backend

assert not backend.INTERPRET, "run without TRITON_INTERPRET=1: the interpreter never compiles"

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8",
        torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*u8"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")
recorded: dict = {}


def _record(self, *args, grid, warmup, **kwargs):
    names = self.arg_names
    bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    constexprs = {p.name for p in self.params if p.is_constexpr}
    sig, const = {}, {}
    for name in names:
        value = bound[name]
        if name in constexprs:
            sig[name], const[(names.index(name),)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    if self.debug:  # @triton.jit(debug=True): compiled with its device asserts, as at run time
        options["debug"] = True
    options = tuple(sorted(options.items()))
    key = (self.fn.__name__, tuple(sig.items()), tuple(sorted(const.items())), options)
    recorded.setdefault(key, (self, sig, const, dict(options)))


def _scratch(kind, shape, device, dtype=torch.float32, zeroed=False):
    return torch.zeros(shape, dtype=dtype, device=device)


def _cases():
    """The launches of the decode loop and of training at the 7B and odd shapes."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for (D, d), B in (((3584, 629), 1), ((3584, 629), 64), ((200, 37), 3)):
            h = torch.randn(B, D).to(dtype)
            w, U = torch.randn(D, d).to(dtype), torch.randn(D, d).to(dtype)
            b, m, s = torch.randn(d).to(dtype), torch.randn(D).to(dtype), torch.rand(d).to(dtype)
            tau, mask = torch.ones(B), torch.ones(B, dtype=torch.bool)
            out = torch.empty(B, D, dtype=dtype)
            for head in (True, False):
                for t in (tau, None):
                    w_, b_, U_, m_, s_ = (w, b, U, m, s) if head else (None,) * 5
                    backend.prepare_latent_step(w_, b_, U_, m_, t, s_, 1e-6, mask, out, _scratch)(h)
            backend.pca_project(h, w, b)
            backend.pca_project(torch.randn(B, d).to(dtype), w.T, None)  # backward: d hidden
            backend.pca_project(h.T, torch.randn(B, d).to(dtype), None)  # backward: d weight
            backend.pca_reconstruct(torch.randn(B, d).to(dtype), U, m, s)
            backend.norm_calibrate(h, tau, 1e-6)
            backend.reembed(torch.zeros(B, dtype=torch.long), h, mask, torch.randn(97, D).to(dtype), out)
            backend.ema_update(torch.zeros(1), torch.rand(B).to(dtype), 0.9)


def main() -> int:
    JITFunction.run = _record
    _cases()
    for arch in (80, 90):
        for (name, _, const, options), (fn, sig, constexprs, opts) in recorded.items():
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                    target=GPUTarget("cuda", arch, 32), options=opts)
            assert kernel.asm.get("cubin"), f"{name}: no cubin"
            flags = ",".join(f"{fn.arg_names[i]}={v}" for (i,), v in const)
            print(f"sm_{arch} {name} [{flags}] {opts} ok")
    print(f"{len(recorded)} variants x 2 archs compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
