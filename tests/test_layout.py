"""The package layout: the old module names still import (one module object each), product code owns its pieces."""
import importlib

import pytest
import torch

from gapkern._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_is_the_moved_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__name__ == MOVED[old]  # the real module keeps its own name


def test_the_flat_data_names_are_re_exported():
    import gapkern.data as data
    from gapkern.data import embeddings, images, samples, targets

    assert data.load_samples is samples.load_samples and data.pool_targets is targets.pool_targets
    assert data.image_inputs is images.image_inputs and data.visual_embeddings is embeddings.visual_embeddings


def test_force_tokens_is_product_code():
    from gapkern import sampling, testing

    assert testing.ForceTokens is sampling.ForceTokens


def test_row_norms_is_the_mean_norm_of_each_rows_images():
    from gapkern.models.qwen2_5_vl.state import own_norms, row_norms

    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    norms = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)  # row 0: 1, 3; row 2: 5
    assert torch.equal(row_norms(norms, mask), torch.tensor([2.0, 0.0, 5.0]))
    assert torch.equal(own_norms(None, None, 2, "cpu"), torch.zeros(2))
