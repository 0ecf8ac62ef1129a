"""How big a demo run is: lines, steps, the model's size. ``full`` is the default; ``small`` is CI's."""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Plan", "PLANS"]


@dataclass(frozen=True)
class Plan:
    size: str  # the model's size (gapkern.demo.model.SIZES)
    train_per_task: int  # training lines per task (two tasks)
    eval_per_task: int  # evaluation lines per task
    base_steps: int  # the plain-text fine-tune that makes the base model, stopped early
    steps: int  # GAP training and the text-only control: the same number of steps each
    batch: int = 16
    lr: float = 1e-3
    attempts: int = 8  # N of the capacity filter
    grid: int = 2  # g: each latent step is K = g*g latents (a 28 px cell crop is 2 x 2 merged tokens)
    variance: float = 0.95  # the PCA keeps this much of the visual embeddings' variance
    # Unwhitened: the random vision tower's embeddings spread ~0.1 per direction and the hidden states ~1, so
    # whitened coefficients start ~600 in mean square and the latent loss swamps the text loss
    whiten: bool = False
    max_new_tokens: int = 64  # the longest teacher response is 40 tokens
    logging_steps: int = 10
    diagnose_lines: int = 32
    small_square: int = 4  # the small squares' side in px (gapkern.demo.task; sized by gapkern.demo.difficulty)

    def to_dict(self) -> dict:
        return asdict(self)


PLANS = {
    # small_square=1: the difficulty rule's version 2 (gapkern.demo.difficulty) sized it
    "full": Plan("full", train_per_task=300, eval_per_task=200, base_steps=100, steps=300, small_square=1),
    # CI's: every stage on a few lines, a smaller model, a few steps
    "small": Plan("small", train_per_task=40, eval_per_task=4, base_steps=8, steps=24, batch=8,
                  logging_steps=2, diagnose_lines=4),
}
