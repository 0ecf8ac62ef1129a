"""The modules the package layout moved, still importable under their old names.

``import gapkern.pca`` (or ``from gapkern.targets import TargetReader``, or a
relative ``from .prompts import ...`` inside the package) loads the module at
its new place and binds it under the old name too: one module object, so a
``monkeypatch`` through either name patches both. Nothing is imported before
it is asked for.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {  # old name -> new name
    "gapkern.prompts": "gapkern.data.prompts",
    "gapkern.benchfiles": "gapkern.data.benchfiles",
    "gapkern.targets": "gapkern.data.targets",
    "gapkern.models.prompt": "gapkern.data.images",
    "gapkern.pca": "gapkern.stages.pca",
    "gapkern.build": "gapkern.stages.build",
    "gapkern.curate": "gapkern.stages.curate",
    "gapkern.evaluate": "gapkern.stages.evaluate",
    "gapkern.diagnose": "gapkern.stages.diagnose",
    # the Qwen2.5-VL integration's modules, now one package (gapkern.models.qwen2_5_vl, which re-exports the
    # old module's names itself)
    "gapkern.models.generate": "gapkern.models.qwen2_5_vl.generate",
    "gapkern.models.generate_options": "gapkern.models.qwen2_5_vl.generate_options",
    "gapkern.models.decoder": "gapkern.models.qwen2_5_vl.decoder",
    "gapkern.models.hf_compat": "gapkern.models.qwen2_5_vl.hf_compat",
    "gapkern.models.loop_inputs": "gapkern.models.qwen2_5_vl.inputs",
    "gapkern.models.vision_only": "gapkern.models.qwen2_5_vl.vision_only",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module):
        pass  # already executed under its new name


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`MOVED`; every other name is left to the usual finders."""

    def find_spec(self, name, path=None, target=None):
        new = MOVED.get(name)
        if new is None:
            return None
        real = importlib.util.find_spec(new)
        spec = importlib.util.spec_from_loader(name, _Alias(new), origin=real.origin)
        spec.has_location = real.has_location  # `python -m` and tracebacks see the real file
        return spec


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())  # before an editable install's finder, which knows the old files
