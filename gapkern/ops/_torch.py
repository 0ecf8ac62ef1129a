"""PyTorch reference backend: the math of SPEC section 2, accumulated in float32.

The functions of :class:`gapkern.ops.backend.Backend`, with checked arguments. The latent step is
prepared: ``prepare_latent_step(weight, bias, basis, mean, tau, sigma, eps, latent_mask, out,
workspace)`` returns ``kernel(hidden)``, which writes the step of ``hidden`` into ``out``;
gapkern.ops prepares it once per call for ``latent_step``, once per decode loop for
``bind_latent_step``.
"""
from __future__ import annotations

import torch


_ACC_DTYPES = (torch.float32, torch.float64)


def _acc(t):
    """Accumulation copy: float32 for half types; float32 and float64 (gradcheck) as they are."""
    return t if t.dtype in _ACC_DTYPES else t.float()


def _project(hidden, weight, bias):
    if bias is None:
        return _acc(hidden) @ _acc(weight)
    return torch.addmm(_acc(bias), _acc(hidden), _acc(weight))


def _reconstruct(coeffs32, basis, mean, sigma):
    c = coeffs32 if sigma is None else coeffs32 * _acc(sigma)
    if mean is None:
        return c @ _acc(basis).T
    return torch.addmm(_acc(mean), c, _acc(basis).T)


def _calibrate(z32, tau, eps):
    """z' = z * tau / max(||z||, eps); rows with tau <= 0 stay as they are."""
    return z32 * _norm_factor(z32, tau, eps)[:, None]


def _norm_factor(z32, tau, eps, out=None):
    """tau / max(||z||, eps) per row, 1 where tau <= 0, in z's dtype (into ``out``, a float32 (B,)
    buffer, for float32 rows outside autograd): no host sync, no scalar ``where``.

    float32 rows: the norm accumulated in float64, where the square of every float32 (subnormals
    to the largest) is a normal number and D of them cannot overflow: the plain norm, exact. float64
    rows (references, gradcheck): the plain norm when it is exact, checked on the host (CPU only),
    else LAPACK's scaling (:func:`_scaled_factor`).
    """
    if z32.dtype == torch.float32 and z32.device.type != "mps":  # mps has no float64
        norm = torch.linalg.vector_norm(z32, dim=1, dtype=torch.float64)
        if out is None:
            return (tau / norm.clamp_min(eps)).masked_fill_(tau <= 0, 1.0).to(torch.float32)
        return torch.div(tau, norm.clamp_min_(eps), out=out).masked_fill_(tau <= 0, 1.0)
    if z32.device.type != "cpu" or torch.compiler.is_compiling():
        return _scaled_factor(z32, tau, eps)
    norm = torch.linalg.vector_norm(z32, dim=1)
    if not _plain_norms_exact(norm):
        return _scaled_factor(z32, tau, eps)
    return torch.where(tau > 0, tau / norm.clamp_min(eps), 1.0).to(z32.dtype)


# Plain norms in this range had no square overflow (inf) or fall below the normal range (lost bits).
_EXACT_NORMS = {dt: (torch.finfo(dt).tiny ** 0.5 * 2 ** 10, torch.finfo(dt).max)
                for dt in (torch.float32, torch.float64)}


def _plain_norms_exact(norm) -> bool:
    low, high = _EXACT_NORMS[norm.dtype]
    if norm.numel() == 1:  # one row: one read, no reduction
        return low < norm.item() < high  # NaN: False
    smallest, largest = torch.aminmax(norm)
    return low < smallest.item() and largest.item() < high


def _scaled_factor(z32, tau, eps):
    """tau / max(||z||, eps) per row (1 where tau <= 0) without overflow or underflow.

    ||z|| = m ||z / m|| with m = max |z_i| (LAPACK's nrm2 scaling), and tau / ||z|| taken as
    (tau / m) / ||z / m||: ||z|| itself may exceed the largest float.
    """
    m = z32.abs().amax(dim=1)
    root = torch.linalg.vector_norm(z32 / torch.where(m > 0, m, 1.0)[:, None], dim=1)
    small = m < eps / root.clamp_min(1.0)  # ||z|| < eps (also m == 0) without forming ||z||
    tau = tau.to(z32.dtype)
    scale = torch.where(small, tau / eps, tau / torch.where(small, 1.0, m) / torch.where(small, 1.0, root))
    return torch.where(tau > 0, scale, 1.0)


def pca_project(hidden, weight, bias):
    return _project(hidden, weight, bias).to(hidden.dtype)


def pca_reconstruct(coeffs, basis, mean, sigma):
    return _reconstruct(_acc(coeffs), basis, mean, sigma).to(basis.dtype)


def norm_calibrate(latents, tau, eps):
    return _calibrate(_acc(latents), tau, eps).to(latents.dtype)


def ema_update(tau_state, observed, decay):
    m = observed.float().mean().reshape(1)
    fresh = ~(tau_state > 0)  # 0 or NaN: nothing observed yet
    tau_state.copy_(torch.where(fresh, m, decay * tau_state + (1.0 - decay) * m))


def _write_rows(out, rows, selected):
    """out[b] = rows[b] where ``selected`` (latent_mask[:, None], or None: every row), in place."""
    rows = rows.to(out.dtype)
    if selected is None:
        out.copy_(rows)
    else:
        torch.where(selected, rows, out, out=out)


def reembed(token_ids, latents, latent_mask, embed_weight, out):
    # Latent rows may carry any placeholder id: gather row 0 for them. Text rows gather their own
    # id, so one out of range fails in the gather (a device-side assert on a GPU), never clamps.
    ids = torch.where(latent_mask, 0, token_ids)
    rows = torch.where(latent_mask[:, None], latents.to(out.dtype), embed_weight[ids].to(out.dtype))
    out.copy_(rows)


def latents(hidden, weight, bias, basis, mean, tau, sigma, eps):
    """The latent step's rows (B, D), accumulated in float32 (float64 as it is): project, whiten,
    reconstruct, calibrate. The step's kernel here and, differentiated, every backend's backward."""
    z = _acc(hidden) if weight is None else _reconstruct(_project(hidden, weight, bias), basis, mean, sigma)
    return z if tau is None else _calibrate(z, tau, eps)


def prepare_latent_step(weight, bias, basis, mean, tau, sigma, eps, latent_mask, out, workspace):
    del workspace  # the buffers below belong to this step
    selected = None if latent_mask is None else latent_mask[:, None]  # views: in-place updates show
    if out.dtype != torch.float32:  # half types (float32 copies of the head each call), float64
        def kernel(hidden):
            with torch.no_grad():
                _write_rows(out, latents(hidden, weight, bias, basis, mean, tau, sigma, eps), selected)
        return kernel

    # float32: the same operations as latents(), written into buffers made once, the scale into the rows.
    basis_t = None if basis is None else basis.T
    coeffs = None if weight is None else out.new_empty(out.shape[0], weight.shape[1])
    z, scale = out.new_empty(out.shape), out.new_empty(out.shape[0])

    def kernel(hidden):
        with torch.no_grad():  # a decode-time write into buffers (out= records no graph): differentiate latent_step
            _float32_step(hidden)

    def _float32_step(hidden):
        rows = hidden
        if weight is not None:
            c = torch.mm(hidden, weight, out=coeffs) if bias is None else torch.addmm(bias, hidden, weight, out=coeffs)
            if sigma is not None:
                c.mul_(sigma)
            rows = torch.mm(c, basis_t, out=z) if mean is None else torch.addmm(mean, c, basis_t, out=z)
        if tau is None:
            _write_rows(out, rows, selected)
            return
        factor = _norm_factor(rows, tau, eps, scale)[:, None]
        if selected is None:
            torch.mul(rows, factor, out=out)
        else:
            torch.where(selected, torch.mul(rows, factor, out=z), out, out=out)
    return kernel
