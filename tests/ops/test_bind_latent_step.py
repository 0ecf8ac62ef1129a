"""bind_latent_step: checked and resolved once, then each step goes straight to the backend's kernel,
with the same numbers as ops.latent_step."""
from __future__ import annotations

import pytest
import torch

from gapkern import ops
from gapkern.ops import _cache, _validate, backend
from gapkern.ops import step as step_file

import reference as R
from cases import BACKENDS, DTYPES, Case, cuda_graph, device_for

VARIANTS = ["whitened-masked", "plain-uncalibrated", "identity-calibrated", "identity-copy"]


def step_args(c, variant):
    """(positional head args and tau, keyword args) of latent_step for one variant."""
    head = variant.startswith(("whitened", "plain"))
    tau = None if variant.endswith(("uncalibrated", "copy")) else c.tau
    args = (c.weight, c.bias, c.basis, c.mean, tau) if head else (None, None, None, None, tau)
    kw = dict(sigma=c.sigma if variant.startswith("whitened") else None,
              latent_mask=c.mask if variant.endswith("masked") else None)
    return args, kw


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,B", [((200, 37), 1), ((200, 37), 3), ((3584, 629), 1)],
                         ids=["D200-d37-B1", "D200-d37-B3", "D3584-d629-B1"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bound_step_matches_latent_step(backend, dtype, shape, B, variant):
    c = Case(*shape, B, dtype, device_for(backend))
    args, kw = step_args(c, variant)
    out, expected = c.out_buffer(), c.out_buffer()
    step = ops.bind_latent_step(*args, **kw, out=out)
    assert step.backend == backend and step.out is out
    for trial in range(2):  # a second step on new values reuses what was bound
        hidden = c.hidden if trial == 0 else (R.f64(c.hidden) * -2.5).to(dtype)
        assert step(hidden) is out
        ops.latent_step(hidden, *args, **kw, out=expected)
        assert torch.equal(out, expected), "the bound step computes exactly what latent_step computes"
        ref = R.latent_step(hidden, *args[:4], tau=args[4], sigma=kw["sigma"])
        rows = kw["latent_mask"] if kw["latent_mask"] is not None else torch.ones(B, dtype=torch.bool, device=c.device)
        R.assert_matches(out[rows], ref[rows.cpu()])
        assert (out[~rows] == 7.0).all(), "rows outside latent_mask stay untouched"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bound_step_reads_tau_mask_and_head_in_place(backend):
    """The tensors are bound by reference: a loop updates tau, the mask and the head between steps."""
    c = Case(200, 37, 4, torch.float32, device_for(backend))
    tau, mask, weight = c.tau.clone(), c.mask.clone(), c.weight.clone()
    out, expected = c.out_buffer(), c.out_buffer()
    step = ops.bind_latent_step(weight, c.bias, c.basis, c.mean, tau, sigma=c.sigma, latent_mask=mask, out=out)
    step(c.hidden)
    tau.mul_(3.0)
    mask.copy_(~mask)
    weight.mul_(-0.5)
    step(c.hidden)
    ops.latent_step(c.hidden, weight, c.bias, c.basis, c.mean, c.tau * 3.0, sigma=c.sigma, latent_mask=~c.mask,
                    out=expected)
    assert torch.equal(out[~c.mask], expected[~c.mask])


def test_bound_step_validates_and_resolves_once(monkeypatch):
    c = Case(200, 37, 3, torch.float32, "cpu")
    out = c.out_buffer()
    step = ops.bind_latent_step(c.weight, c.bias, c.basis, c.mean, c.tau, latent_mask=c.mask, out=out)

    def forbidden(*args, **kwargs):
        raise AssertionError("called per step")
    for module, name in ((step_file, "check"), (_validate, "check_orthonormal"),
                         (backend, "module_for"), (_cache, "workspace")):
        monkeypatch.setattr(module, name, forbidden)
    step(c.hidden)
    R.assert_matches(out[c.mask], R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau)[c.mask])


def test_bound_step_keeps_the_backend_it_was_bound_on(monkeypatch):
    from gapkern.triton_kernels import project

    c = Case(200, 37, 3, torch.float32, device_for("triton"))
    with ops.use_backend("triton"):
        step = ops.bind_latent_step(c.weight, c.bias, c.basis, c.mean, c.tau, out=c.out_buffer())
    launched = []
    monkeypatch.setattr(project.project_kernel, "run", lambda *a, _run=project.project_kernel.run, **k:
                        launched.append(1) or _run(*a, **k))
    with ops.use_backend("torch"):
        step(c.hidden)
    assert launched == [1] and step.backend == "triton"


def test_bound_triton_step_holds_its_workspaces():
    """Taken once when bound: later steps look nothing up, and clear_caches() cannot pull them away."""
    c = Case(200, 37, 3, torch.bfloat16, device_for("triton"))
    out = c.out_buffer()
    with ops.use_backend("triton"):
        step = ops.bind_latent_step(c.weight, c.bias, c.basis, c.mean, c.tau, out=out)
    ops.clear_caches()
    step(c.hidden)
    assert not _cache._workspaces
    R.assert_matches(out, R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau))


def bad_binds():
    c = Case(40, 7, 3, torch.float32, "cpu")
    w, b, U, m, out = c.weight, c.bias, c.basis, c.mean, c.out_buffer()
    return [
        ("no-out", lambda: ops.bind_latent_step(w, b, U, m), TypeError, r"out"),
        ("out-rank", lambda: ops.bind_latent_step(out=out[0]), ValueError, r"out: expected a 2-D tensor"),
        ("weight-dtype", lambda: ops.bind_latent_step(w.half(), b, U, m, out=out), TypeError,
         r"weight: expected dtype torch.float32 like out"),
        ("weight-rows", lambda: ops.bind_latent_step(w[:-1], b, U[:-1], m[:-1], out=out), ValueError,
         r"weight: expected size 40 \(D, the hidden size of out\)"),
        ("tau-shape", lambda: ops.bind_latent_step(tau=torch.ones(2), out=out), ValueError, r"tau: expected shape \(3,\)"),
        ("mask-shape", lambda: ops.bind_latent_step(latent_mask=torch.ones(2, dtype=torch.bool), out=out), ValueError,
         r"latent_mask: expected size 3"),
        ("basis-orthonormal", lambda: ops.bind_latent_step(w, b, U * 1.01, m, out=out), ValueError,
         r"basis: expected orthonormal columns"),
        ("identity-extra", lambda: ops.bind_latent_step(None, b, out=out), ValueError,
         r"bias: must be None when weight is None"),
    ]


@pytest.mark.parametrize("name,call,exc,match", bad_binds(), ids=[b[0] for b in bad_binds()])
def test_bad_bind_names_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_a_step_rejects_a_hidden_it_was_not_bound_for():
    c = Case(40, 7, 3, torch.float32, "cpu")
    step = ops.bind_latent_step(c.weight, c.bias, c.basis, c.mean, c.tau, out=c.out_buffer())
    expected = r"hidden: expected a \(3, 40\) torch.float32 tensor on cpu \(the out this step was bound to\), got "
    for hidden, got in ((c.hidden[:2], r"\(2, 40\)"), (c.hidden.double(), r"\(3, 40\) torch.float64"),
                        (c.hidden.tolist(), "list")):
        with pytest.raises(ValueError, match=expected + got):
            step(hidden)


def test_bound_step_of_an_empty_batch_does_nothing():
    c = Case(40, 7, 0, torch.float32, "cpu")
    out = c.out_buffer()
    step = ops.bind_latent_step(c.weight, c.bias, c.basis, c.mean, c.tau, out=out)
    assert step(c.hidden) is out and out.shape == (0, 40)


def test_bound_step_traces_under_torch_compile():
    c = Case(40, 7, 3, torch.float32, "cpu")
    out = torch.zeros(3, 40)
    step = ops.bind_latent_step(c.weight, c.bias, c.basis, c.mean, c.tau, latent_mask=c.mask, out=out)
    doubled = torch.compile(lambda h: step(h) * 2.0, fullgraph=True, backend="aot_eager")(c.hidden)
    ref = R.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau)
    R.assert_matches(out[c.mask], ref[c.mask])
    assert (out[~c.mask] == 0).all()
    R.assert_matches(doubled, R.f64(out) * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bound_step_replays_in_a_cuda_graph_without_host_sync(backend, dtype):
    c = Case(3584, 629, 5, dtype, "cuda")
    hidden, tau, out = c.hidden.clone(), c.tau.clone(), c.out_buffer()
    step = ops.bind_latent_step(c.weight, c.bias, c.basis, c.mean, tau, sigma=c.sigma, latent_mask=c.mask, out=out)
    graph = cuda_graph(lambda: step(hidden))  # the warm-up compiles and loads the kernels, packs the head
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(hidden)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for trial in range(2):
        hidden.copy_((torch.randn_like(hidden, dtype=torch.float32) * (trial + 1)).to(dtype))
        tau.copy_(torch.rand_like(tau) * 5 + 1)
        out.fill_(7.0)
        graph.replay()
        torch.cuda.synchronize()
        ref = R.latent_step(hidden, c.weight, c.bias, c.basis, c.mean, tau, sigma=c.sigma)
        R.assert_matches(out[c.mask], ref[c.mask.cpu()])
        assert (out[~c.mask] == 7.0).all()
