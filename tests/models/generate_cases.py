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


def dynamic_and_warmed_up(model, head, config, batch, monkeypatch, **kw):
    """``generate(**batch, **kw)`` on ``model`` patched with ``head`` and ``config``, twice: as it decodes on the CPU
    (no graph), then down the graph path with capture standing in as the warm-up that runs the step twice after
    prefill and undoes it. Returns (dynamic, warmed); the model is unpatched after."""
    from gapkern.models.qwen2_5_vl import generate as G

    gapkern.patch(model, head, config)
    try:
        dynamic = model.generate(**batch, **kw)
        monkeypatch.setattr(G, "_modes", lambda *a: (True, True))
        monkeypatch.setattr(G.step_graph, "capture", lambda dec: G.step_graph.warm_up(dec, 2))
        warmed = model.generate(**batch, **kw)
    finally:
        gapkern.unpatch(model)
    return dynamic, warmed
