"""Shared by the generate tests: the scripted batch's rows, the cache kinds, and span scripting."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

import gapkern
from gapkern.testing import ForceTokens, tiny_head

K = 2  # latents per span: short spans keep the CPU tests fast
ROWS = [(4, None), (2, (56, 56)), (6, (56, 84))]  # three prompt lengths, left padding; row 0 has no image
CACHES = [pytest.param(False, id="dynamic"), pytest.param(True, id="static")]


def forcing(batch, ids, sched):
    """ForceTokens for ``batch``: ``sched`` maps (row, new position) to the token forced there; the latent
    start token is banned everywhere else (random weights never open a span unasked)."""
    return LogitsProcessorList([ForceTokens(batch["input_ids"].shape[1], sched, banned=[ids.latent_start])])


def hf_and_patched(model, ids, batch, static=False, **kw):
    """The unpatched generate's output and the patched one's (PCA head, rms calibration), same seed."""
    torch.manual_seed(0)
    ref = model.generate(**batch, **kw)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=K, calibration="rms"))
    try:
        torch.manual_seed(0)
        out = model.generate(**batch, static_cache=static, **kw)
    finally:
        gapkern.unpatch(model)
    return ref, out
