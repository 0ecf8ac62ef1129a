"""What every demo stage and measurement shares: the run (folder, plan, seed), the arms and where each lives, and
how a checkpoint of the demo is loaded (its own module, so the stages and the measurements import it without
importing each other)."""
from __future__ import annotations

from dataclasses import dataclass

from .folder import Folder
from .plan import Plan

__all__ = ["ARMS", "Run", "load", "settings"]


@dataclass
class Run:
    folder: Folder
    plan: Plan
    seed: int
    progress: bool | None = None

    def train_file(self) -> str:
        return self.folder("task", "train.jsonl")

    def eval_file(self) -> str:
        return self.folder("task", "eval.jsonl")


def load(path: str):
    """A gapkern checkpoint (or a plain one, as the Gap class without its parts) and its tokenizer, eval mode."""
    from ..loaders import from_pretrained, load_tokenizer

    return from_pretrained(path, gap_class=True).eval(), load_tokenizer(path)


def settings(run: Run) -> dict:
    """The image settings of every checkpoint of the demo (they all come from ``init``: the processor's defaults)."""
    from ..data.images import image_settings

    return image_settings(run.folder("init"))


# arm -> (training folder, build folder, head file in pca/ or None: output-as-input), each from the base model
ARMS = {"text-only": ("text", "data", None), "output-as-input": ("oai", "data-all", None),
        "PCA, all latent": ("pca-all", "data-all", "head.safetensors"), "GAP": ("gap", "data", "head.safetensors"),
        "full-dim head": ("full", "data", "head-full.safetensors")}
