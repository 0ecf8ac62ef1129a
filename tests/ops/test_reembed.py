"""reembed: parity with the reference, and ids out of range on text rows."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gapkern import ops

import reference as R
from cases import SHAPES, Case, case_for, dtypes, grid, rows


@grid
@dtypes
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
@rows
def test_reembed_matches_reference(backend, dtype, shape, B):
    c = case_for(backend, shape, B, dtype)
    token_ids = c.token_ids.clone()
    token_ids[c.mask] = 10 ** 6  # latent rows carry a placeholder id outside the table
    out = ops.reembed(token_ids, c.hidden, c.mask, c.embed)
    ref = torch.where(c.mask.cpu()[:, None], R.f64(c.hidden).cpu(),
                      R.f64(c.embed).cpu()[c.token_ids.cpu().clamp(max=96)])
    R.assert_matches(out, ref)
    buf = c.out_buffer(strided=True)
    assert ops.reembed(token_ids, c.hidden, c.mask, c.embed, out=buf) is buf
    R.assert_matches(buf, ref)


@grid
@pytest.mark.parametrize("bad", [-1, 97, 10 ** 6], ids=["negative", "V", "huge"])
def test_reembed_rejects_out_of_range_ids_of_text_rows(backend, bad):
    c = case_for(backend, (200, 37), 4, torch.float32)
    ids = c.token_ids.clone()
    ids[c.mask] = -(10 ** 6)  # latent rows: placeholders, any value
    ids[3] = bad  # row 3 is a text row
    with pytest.raises(ValueError, match=rf"token_ids: expected ids in \[0, 97\) .* got {bad} on row 3"):
        ops.reembed(ids, c.hidden, c.mask, c.embed)
    ids[3] = 96
    out = ops.reembed(ids, c.hidden, c.mask, c.embed)  # the last row of the table is fine
    R.assert_matches(out[3], R.f64(c.embed)[96])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_reembed_out_of_range_id_fails_on_the_device(backend):
    """On a GPU the check is device-side (no host sync): the process gets a CUDA error, never clamped rows."""
    if any(k.startswith("NV_SANITIZER") or k == "CUDA_INJECTION64_PATH" for k in os.environ):
        pytest.skip("under compute-sanitizer the intended device trap would count as a memcheck error")
    code = f"""
import torch
from gapkern import ops
ops.set_backend({backend!r})
embed = torch.randn(97, 64, device="cuda")
latents = torch.randn(2, 64, device="cuda")
mask = torch.tensor([True, False], device="cuda")
ops.reembed(torch.tensor([10 ** 6, 97], device="cuda"), latents, mask, embed)
torch.cuda.synchronize()
print("no error")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "no error" not in run.stdout, run.stdout + run.stderr[-2000:]


# -- bad input (gathered from tests/test_ops_api.py) ----------------------------------------------

def bad_reembed_calls():
    D, d = 40, 7
    c = Case(D, d, 3, torch.float32, "cpu")
    h = c.hidden
    return [
        ("ids-dtype", lambda: ops.reembed(torch.zeros(3), h, c.mask, c.embed), TypeError, r"token_ids: expected dtype int64 or int32"),
        ("latents-rows", lambda: ops.reembed(c.token_ids, h[:2], c.mask, c.embed), ValueError, r"latents: expected size 3"),
        ("ids-range", lambda: ops.reembed(torch.tensor([-7, 97, 3]), h, c.mask, c.embed), ValueError,
         r"token_ids: expected ids in \[0, 97\) \(the rows of embed_weight\) on text rows, got 97 on row 1"),
    ]


@pytest.mark.parametrize("name,call,exc,match", bad_reembed_calls(), ids=[c[0] for c in bad_reembed_calls()])
def test_bad_reembed_input_names_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
