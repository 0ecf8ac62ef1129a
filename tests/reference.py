"""Float64 references of SPEC section 2, written independently of gapkern, and
the tolerance rule: float32 rtol 1e-5; half types compared after rounding the
reference to the same dtype, atol 2 ulp of the output magnitude."""
from __future__ import annotations

import math

import torch

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def f64(t):
    return None if t is None else t.to(torch.float64)


def project(hidden, weight, bias=None):
    c = f64(hidden) @ f64(weight)
    return c if bias is None else c + f64(bias)


def reconstruct(coeffs, basis, mean=None, sigma=None):
    c = f64(coeffs)
    if sigma is not None:
        c = c * f64(sigma)
    z = c @ f64(basis).T
    return z if mean is None else z + f64(mean)


def calibrate(latents, tau, eps=1e-6):
    z = f64(latents)
    tau = f64(torch.as_tensor(tau)).reshape(-1).expand(z.shape[0])
    out = z.clone()
    for b in range(z.shape[0]):
        if tau[b] > 0:
            out[b] = z[b] * tau[b] / max(z[b].norm().item(), eps)
    return out


def latent_step(hidden, weight=None, bias=None, basis=None, mean=None, tau=None, sigma=None, eps=1e-6):
    z = f64(hidden) if weight is None else reconstruct(project(hidden, weight, bias), basis, mean, sigma)
    return z if tau is None else calibrate(z, tau, eps)


def ulp(magnitude: float, dtype) -> float:
    return 2.0 ** (math.floor(math.log2(max(magnitude, 1e-30))) - MANTISSA_BITS[dtype])


def assert_matches(out, ref, dtype=None):
    """``out`` (any dtype) against the float64 ``ref`` with SPEC's tolerance for ``dtype``."""
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == dtype, (out.dtype, dtype)
    if out.numel() == 0:
        return
    got = out.detach().cpu().to(torch.float64)
    ref = ref.detach().cpu()
    assert torch.isfinite(got).all(), "non-finite values in the output"
    magnitude = ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * magnitude)
        return
    rounded = ref.to(dtype).to(torch.float64)
    err = (got - rounded).abs().max().item()
    assert err <= 2 * ulp(magnitude, dtype), f"max error {err} > 2 ulp ({2 * ulp(magnitude, dtype)}) of {magnitude}"
