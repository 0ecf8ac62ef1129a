"""The package layout: the old module names still import (one module object each), product code owns its pieces."""
import importlib

import pytest
import torch

import gapkern
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


# The names the single module gapkern.models.qwen2_5_vl defined (or imported for use) before it became a package.
OLD_QWEN2_5_VL_NAMES = ["MODEL_TYPE", "CheckpointError", "check_ids", "GapState", "is_patched", "patch", "unpatch",
                        "GapQwen2_5_VLForConditionalGeneration", "gap_generate", "row_norms"]


@pytest.mark.parametrize("name", OLD_QWEN2_5_VL_NAMES)
def test_the_old_qwen2_5_vl_module_names_import_from_the_package(name):
    import gapkern.models.qwen2_5_vl as family
    from gapkern.models.qwen2_5_vl import generate, model, patching, state

    where = {"patch": patching, "unpatch": patching, "is_patched": patching, "gap_generate": generate,
             "CheckpointError": model, "GapQwen2_5_VLForConditionalGeneration": model}.get(name, state)
    assert getattr(family, name) is getattr(where, name)


def test_patch_is_the_one_familys_with_no_dispatch_layer():
    import gapkern.models as models
    from gapkern.models.qwen2_5_vl import patching

    assert models.patch is patching.patch and models.unpatch is patching.unpatch
    with pytest.raises(TypeError, match=r"model: expected a Qwen2_5_VLForConditionalGeneration .*model_type 'llama'"):
        gapkern.patch(_LlamaLike())


class _LlamaLike(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "llama"})()
        self.lm_head = torch.nn.Linear(2, 2)


def _top_level_imports(path: str, package: str) -> set[str]:
    """The sibling modules ``path`` imports at module level (``from .x import``, ``from . import x``)."""
    import ast

    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return {f"{package}.{name.split('.')[0]}" for name in found}


def test_the_qwen2_5_vl_package_has_no_import_cycle():
    """Every module of the family imports its siblings at module level without a cycle (the order the
    package's __init__ can load them in exists)."""
    import os

    import gapkern.models.qwen2_5_vl as family

    folder, package = os.path.dirname(family.__file__), family.__name__
    graph = {f"{package}.{name[:-3]}": _top_level_imports(os.path.join(folder, name), package)
             for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py"}
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(module):] + [module])}"
        if module in done:
            return
        visiting.append(module)
        for dep in graph.get(module, ()):
            visit(dep)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)
    assert len(graph) >= 10 and f"{package}.hf_compat" in done
