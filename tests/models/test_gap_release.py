"""GapState.release: the decoder a static generate keeps (its static KV cache, buffers and, on a GPU, its
CUDA graph) can be dropped, and the next generate works as before."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import gapkern
from gapkern.testing import tiny_head, tiny_prompts, tiny_qwen2_5_vl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_release_frees_the_kept_decoder_and_the_next_generate_matches():
    model, ids = tiny_qwen2_5_vl(seed=0)
    gapkern.patch(model, tiny_head(model), ids.gap_config(latent_budget=2, calibration="ema"))
    batch = tiny_prompts(ids, [(4, None), (2, (56, 56))], seed=1)
    kw = dict(max_new_tokens=6, do_sample=False, static_cache=True)
    try:
        tau = model.gap.tau_ema.clone()
        first = model.generate(**batch, **kw)
        kept = model.gap.decoder
        assert kept is not None and kept.cache is not None, "a static generate keeps its decoder"
        freed = weakref.ref(kept)
        cache = weakref.ref(kept.cache)
        del kept
        model.gap.release()
        gc.collect()
        assert model.gap.decoder is None
        assert freed() is None and cache() is None, "nothing else holds the decoder or its static cache"
        model.gap.tau_ema.copy_(tau)
        again = model.generate(**batch, **kw)
        assert torch.equal(again, first)
        assert model.gap.decoder is not None, "the next static generate keeps a new decoder"
        model.gap.release()
        model.gap.release()  # releasing nothing is fine
        assert model.gap.decoder is None
    finally:
        gapkern.unpatch(model)
