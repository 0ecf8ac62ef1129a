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


def _all_imports(path: str, module: str, modules: set[str]) -> set[str]:
    """Every gapkern module ``path`` (the module ``module``) imports, at module level or inside a function:
    ``from X import y`` counts X.y where that is a module, else X."""
    import ast

    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != module}


def test_the_package_has_no_import_cycle_even_through_function_level_imports():
    """No circle of gapkern modules importing each other, counting the imports inside functions too (issue 16: the
    sample / prompt / protocol / sampling path and the demo's stages / measurements were circles, tied by deferred
    imports). A package's ``__init__`` counts as a module (importing ``gapkern.data`` runs it)."""
    import os

    root = os.path.dirname(os.path.abspath(gapkern.__file__))
    paths = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))[:-3].replace(os.sep, ".")
                paths[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    modules = set(paths)
    graph = {module: _all_imports(path, module, modules) for module, path in paths.items()}
    done, visiting, cycles = set(), [], []

    def visit(module):
        if module in visiting:
            cycles.append(" -> ".join(visiting[visiting.index(module):] + [module]))
            return
        if module in done:
            return
        visiting.append(module)
        for dep in sorted(graph[module]):
            if not (module.startswith(dep + ".") and paths[dep].endswith("__init__.py")):  # a package's own parent
                visit(dep)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert len(graph) > 80 and "gapkern.data.samples" in graph
    assert not cycles, "\n".join(cycles)
