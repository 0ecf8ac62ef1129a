"""The ops' contract shared by all of them: empty batches, torch.compile of every op, the orthonormality
check, the workspace cache, and each custom op's registration (opcheck, the fake impls' checks)."""
from __future__ import annotations

import pytest
import torch

from gapkern import ops

import reference as R
from cases import DTYPES, Case

D, d = 40, 7


def small(B=3, dtype=torch.float32):
    return Case(D, d, B, dtype, "cpu")


def test_empty_batch_returns_empty_results():
    c = small(B=0)
    assert ops.pca_project(c.hidden, c.weight, c.bias).shape == (0, d)
    assert ops.pca_reconstruct(c.hidden[:, :d], c.basis, c.mean).shape == (0, D)
    assert ops.norm_calibrate(c.hidden, c.tau).shape == (0, D)
    assert ops.latent_step(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau).shape == (0, D)
    assert ops.reembed(c.token_ids, c.hidden, c.mask, c.embed).shape == (0, D)










def test_torch_compile_traces_through_every_op():
    c = small()
    state = torch.zeros(1)

    def every_op(h, w, b, U, m, tau, mask, ids, embed, state):
        coeffs = ops.pca_project(h, w, b)
        z = ops.norm_calibrate(ops.pca_reconstruct(coeffs, U, m, c.sigma), tau)
        ops.ema_update(state, torch.linalg.vector_norm(h, dim=1), 0.5)
        return z, ops.reembed(ids, z, mask, embed)

    seen = []

    def recording(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    compiled = torch.compile(every_op, fullgraph=True, backend=recording)
    z, embeds = compiled(c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, c.mask, c.token_ids, c.embed, state)
    ref = R.calibrate(R.reconstruct(R.project(c.hidden, c.weight, c.bias), c.basis, c.mean, c.sigma), c.tau)
    R.assert_matches(z, ref)
    R.assert_matches(embeds[c.mask], ref[c.mask])
    R.assert_matches(embeds[~c.mask], R.f64(c.embed)[c.token_ids[~c.mask]])
    assert state.item() == pytest.approx(torch.linalg.vector_norm(c.hidden, dim=1).mean().item(), rel=1e-6)
    ops_seen = {t.split(".")[1] for t in seen if t.startswith("gapkern.")}
    assert ops_seen == {"pca_project", "pca_reconstruct", "norm_calibrate", "ema_update", "reembed_out"}, seen






# -- the orthonormality check -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3584, 629), (40, 7)], ids=["D3584-d629", "D40-d7"])
def test_check_orthonormal_accepts_rounded_orthonormal_bases(dtype, shape):
    """An orthonormal basis stored in bfloat16 / float16 / float32 passes; 2% off does not."""
    basis = torch.linalg.qr(torch.randn(*shape, dtype=torch.float64))[0]
    assert ops.check_orthonormal(basis.to(dtype)) is not None
    with pytest.raises(ValueError, match="orthonormal"):
        ops.check_orthonormal((basis * 1.02).to(dtype), name="U")
    nan = basis.to(dtype).clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="got max"):
        ops.check_orthonormal(nan)


def test_check_orthonormal_is_cached_per_tensor_and_version(monkeypatch):
    """A passing check is kept while the tensor is unmodified; an in-place edit is checked again."""
    from gapkern.ops import _cache, _validate

    basis = torch.linalg.qr(torch.randn(40, 7, dtype=torch.float64))[0].float()
    calls = []
    real = _validate._gram_error
    monkeypatch.setattr(_validate, "_gram_error", lambda t: calls.append(1) or real(t))
    ops.check_orthonormal(basis)
    ops.check_orthonormal(basis)
    assert len(calls) == 1, "the second check of the same tensor is a cache hit"
    basis.mul_(2.0)  # the version counter moves
    with pytest.raises(ValueError, match="orthonormal"):
        ops.check_orthonormal(basis)
    key = ("orthonormal", id(basis))
    assert key in _cache._checks
    del basis
    assert key not in _cache._checks, "the entry of a freed tensor goes with it"


def test_pca_latent_head_rejects_a_non_orthonormal_basis():
    import gapkern

    basis = torch.linalg.qr(torch.randn(40, 7, dtype=torch.float64))[0].float()
    head = gapkern.PCALatentHead(basis, torch.zeros(40))
    assert head.basis.shape == (40, 7)
    with pytest.raises(ValueError, match=r"basis: expected orthonormal columns"):
        gapkern.PCALatentHead(basis + 0.05, torch.zeros(40))
    gapkern.PCALatentHead(torch.eye(40, 7), torch.zeros(40))  # GapState.from_dict's placeholder
    with torch.device("meta"):  # from_pretrained builds the model on meta, then loads the values
        assert gapkern.PCALatentHead(torch.eye(40, 7), torch.zeros(40)).basis.is_meta


# -- workspaces: bounded, pinned while a graph captures them, cleared on demand ------------

def test_workspaces_are_bounded_and_cleared(monkeypatch):
    from gapkern.ops import _cache

    _cache.clear_caches()
    monkeypatch.setattr(_cache, "LIMIT", 3)
    first = _cache.workspace("test", (4,), "cpu")
    assert _cache.workspace("test", (4,), "cpu") is first, "same kind, shape, dtype, device: the same buffer"
    for n in range(5, 9):
        _cache.workspace("test", (n,), "cpu")
    kept = [k for k in _cache._workspaces if k[0] == "test"]
    assert len(kept) == 3 and ("test", (4,), torch.float32, torch.device("cpu")) not in kept, "least recent dropped"
    monkeypatch.setattr(_cache, "capturing", lambda device: True)  # as if a CUDA graph were capturing
    pinned = _cache.workspace("test", (100,), "cpu")
    monkeypatch.setattr(_cache, "capturing", lambda device: False)
    for n in range(9, 20):
        _cache.workspace("test", (n,), "cpu")
    assert _cache.workspace("test", (100,), "cpu") is pinned, "a buffer a graph captured is never dropped"
    ops.clear_caches()
    assert not _cache._workspaces and not _cache._pinned


# -- the custom ops themselves: schema, fake impl, autograd registration -------------------------

def custom_op_calls():
    """(custom op, a valid call's arguments) for every gapkern:: op, small CPU tensors."""
    c = small()
    tau = c.tau
    step = (c.hidden, c.weight, c.bias, c.basis, c.mean, tau, c.sigma, 1e-6, c.mask)
    return [
        ("pca_project", (c.hidden, c.weight, c.bias)),
        ("pca_reconstruct", (c.hidden[:, :d].contiguous(), c.basis, c.mean, c.sigma)),
        ("norm_calibrate", (c.hidden, tau, 1e-6)),
        ("ema_update", (torch.zeros(1), torch.rand(5), 0.5)),
        ("reembed_out", (c.token_ids, c.hidden, c.mask, c.embed, torch.empty(3, D))),
        ("latent_step", step),
        ("latent_step_out", step + (torch.zeros(3, D),)),
    ]


@pytest.mark.parametrize("name,args", custom_op_calls(), ids=[n for n, _ in custom_op_calls()])
def test_custom_op_passes_torch_library_opcheck(name, args):
    """torch.library.opcheck: the schema's mutations, the fake impl, the autograd registration and
    AOT dispatch agree with what the op really does."""
    op = getattr(torch.ops.gapkern, name).default
    grad = name in ("pca_project", "latent_step")
    args = tuple(a.clone().requires_grad_(grad and a.is_floating_point() and i < 3) if isinstance(a, torch.Tensor)
                 else a for i, a in enumerate(args))
    torch.library.opcheck(op, args)


def fake_bad_calls():
    """A bad call of each custom op made straight (not through the public function) on fake tensors."""
    c = small()
    step = (c.hidden, c.weight, c.bias, c.basis, c.mean, c.tau, c.sigma, 1e-6, c.mask)
    return [
        ("pca_project", (c.hidden[:, :-1], c.weight, c.bias), ValueError, r"weight: expected size 39"),
        ("pca_reconstruct", (c.hidden[:, :5], c.basis, c.mean, c.sigma), ValueError, r"coeffs: expected size 7"),
        ("norm_calibrate", (c.hidden, torch.ones(2), 1e-6), ValueError, r"tau: expected shape \(3,\)"),
        ("ema_update", (torch.zeros(2), torch.rand(5), 0.5), ValueError, r"tau_state: expected size 1"),
        ("reembed_out", (c.token_ids, c.hidden, c.mask, c.embed, torch.empty(3, D + 1)), ValueError,
         r"out: expected shape \(3, 40\)"),
        ("latent_step", step[:6] + (c.sigma[:-1],) + step[7:], ValueError, r"sigma: expected size 7"),
        ("latent_step_out", step + (torch.zeros(2, D),), ValueError, r"out: expected shape \(3, 40\)"),
    ]


@pytest.mark.parametrize("name,args,exc,match", fake_bad_calls(), ids=[c[0] for c in fake_bad_calls()])
def test_the_fake_impls_check_what_the_public_functions_check(name, args, exc, match):
    """Under torch.compile only the fake impl sees a direct call of the op: it raises the public
    function's error, naming the argument."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode, pytest.raises(exc, match=match):
        getattr(torch.ops.gapkern, name)(*fake)
