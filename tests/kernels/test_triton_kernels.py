"""Triton-specific properties beyond the shared parity tests: launch counts,
workspace and cache reuse, split-K, the backward's transposed projections,
rounding of half-precision stores. Runs under the interpreter without a GPU."""
from __future__ import annotations

import pytest
import torch

from gapkern import ops

import reference as R
from cases import Case, cuda_graph, device_for

pytest.importorskip("triton")
from gapkern.triton_kernels import calibrate, ema, embed, project, reconstruct  # noqa: E402

KERNELS = (project.project_kernel, reconstruct.reconstruct_kernel, calibrate.calibrate_kernel,
           ema.ema_kernel, embed.reembed_kernel)
DEVICE = device_for("triton")


@pytest.fixture(autouse=True)
def _triton_backend():
    with ops.use_backend("triton"):
        yield


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched, in order."""
    seen = []
    for kernel in KERNELS:
        def counted(*args, _run=kernel.run, _name=kernel.__name__, **kwargs):
            seen.append(_name)
            return _run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", counted)
    return seen


@pytest.mark.parametrize("B", [1, 64], ids=["B1", "B64"])
def test_latent_step_with_a_head_launches(launches, B):
    """Project, reconstruct; calibrated, a third launch takes the norm of the reconstructed latents."""
    c = Case(3584, 629, B, torch.bfloat16, DEVICE)
    out = c.out_buffer()
    ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=c.sigma, latent_mask=c.mask, out=out)
    assert launches == ["project_kernel", "reconstruct_kernel", "calibrate_kernel"]
    ref = R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=c.sigma)
    R.assert_matches(out[c.mask], ref[c.mask.cpu()])
    launches.clear()
    ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, sigma=c.sigma, latent_mask=c.mask, out=out)
    assert launches == ["project_kernel", "reconstruct_kernel"]


def test_identity_head_is_one_launch(launches):
    c = Case(200, 37, 3, torch.float16, DEVICE)
    out = c.out_buffer(strided=True)
    ops.latent_step(c.hidden, tau=c.tau, latent_mask=c.mask, out=out)
    assert launches == ["calibrate_kernel"]
    R.assert_matches(out[c.mask], R.latent_step(c.hidden, tau=c.tau)[c.mask.cpu()])
    assert (out[~c.mask] == 7.0).all()


def test_steady_state_reuses_its_workspaces():
    """A second step with the same shapes allocates nothing: the same float32 workspaces."""
    from gapkern.ops import _cache

    c = Case(200, 37, 3, torch.float32, DEVICE)
    out = c.out_buffer()
    step = lambda: ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, out=out)  # noqa: E731
    step()
    kept = {k: v for k, v in _cache._workspaces.items() if k[0].startswith("triton.")}
    assert {k[0] for k in kept} == {"triton.partials", "triton.latents"}
    step()
    now = {k: v for k, v in _cache._workspaces.items() if k[0].startswith("triton.")}
    assert now.keys() == kept.keys() and all(now[k] is v for k, v in kept.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_split_k_partials_sum_to_the_projection(dtype):
    """At B=1 the 7B projection is split over K; the float32 partial sums add up to h @ W + b."""
    c = Case(3584, 629, 1, dtype, DEVICE)
    splits, k_per_split, cfg = project.split_plan(1, 629, 3584, c.hidden.device)
    assert splits > 1
    partials = torch.full((splits, 1, 629), float("nan"), device=c.hidden.device)
    project.launch(c.hidden, c.weight, c.bias, partials, splits, k_per_split, cfg)
    R.assert_matches(partials.sum(0), R.project(c.hidden, c.weight, c.bias), dtype=torch.float32)


@pytest.mark.parametrize("B", [1, 3, 64], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_projection_backward_runs_on_the_kernel(B, dtype):
    """dh = g W^T and dW = h^T g: transposed views, reduction over d or over B."""
    c = Case(3584, 629, B, dtype, DEVICE)
    grad = (torch.randn(B, 629, dtype=torch.float64) * 0.1).to(dtype).to(c.hidden.device)
    R.assert_matches(ops.pca_project(grad, c.weight.T), R.project(grad, c.weight.T))
    R.assert_matches(ops.pca_project(c.hidden.T, grad), R.project(c.hidden.T, grad))


def test_autograd_through_the_triton_projection():
    c = Case(200, 37, 5, torch.float32, DEVICE)
    hidden = c.hidden.clone().requires_grad_(True)
    weight = c.weight.clone().requires_grad_(True)
    bias = c.bias.clone().requires_grad_(True)
    ops.pca_project(hidden, weight, bias).square().sum().backward()
    h, w, b = (t.detach().double().requires_grad_(True) for t in (c.hidden, c.weight, c.bias))
    (h @ w + b).square().sum().backward()
    for got, ref in ((hidden, h), (weight, w), (bias, b)):
        R.assert_matches(got.grad, ref.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_stores_round_to_nearest_even(dtype):
    """float32 -> half stores round like torch (the interpreter's own cast truncates bfloat16)."""
    x = torch.randn(4, 1000) * 100
    low = 23 - R.MANTISSA_BITS[dtype]  # float32 mantissa bits dropped by the store
    bits = x[:2].view(torch.int32) & ~((1 << low) - 1)
    x[:2] = (bits | (1 << (low - 1))).view(torch.float32)  # exact ties: round half to even
    x = x.float().to(DEVICE)
    out = torch.empty(4, 1000, dtype=dtype, device=DEVICE)
    calibrate.launch(x, out)
    assert torch.equal(out, x.to(dtype))


def test_latent_step_with_no_latent_rows_writes_nothing():
    c = Case(200, 37, 3, torch.float16, DEVICE)
    out = c.out_buffer()
    none = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, latent_mask=none, out=out)
    assert (out == 7.0).all()


# -- real GPU (compiled kernels, not the interpreter) --------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("B", [1, 64], ids=["B1", "B64"])
def test_gpu_latent_step_matches_reference_without_host_sync(dtype, B):
    c = Case(3584, 629, B, dtype, "cuda")
    out = c.out_buffer()
    step = lambda: ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau,  # noqa: E731
                                   sigma=c.sigma, latent_mask=c.mask, out=out)
    step()  # warm-up: compiles, allocates the workspace, caches the constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, sigma=c.sigma)
    R.assert_matches(out[c.mask], ref[c.mask.cpu()])


@pytest.mark.gpu
def test_gpu_latent_step_replays_in_a_cuda_graph():
    c = Case(3584, 629, 1, torch.bfloat16, "cuda")
    out = c.out_buffer()
    graph = cuda_graph(lambda: ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, out=out))
    c.hidden.copy_(torch.randn_like(c.hidden))
    graph.replay()
    torch.cuda.synchronize()
    R.assert_matches(out, R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau))


@pytest.mark.gpu
def test_gpu_graph_replays_follow_in_place_edits_of_mean_and_basis():
    """No value derived from mean or basis is cached: a replay after an edit is the step of the edit."""
    c = Case(3584, 629, 2, torch.bfloat16, "cuda")
    out = c.out_buffer()
    graph = cuda_graph(lambda: ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, out=out))
    c.mean.data.mul_(-3.0)
    c.basis.data.copy_(c.basis.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    R.assert_matches(out, R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau))
