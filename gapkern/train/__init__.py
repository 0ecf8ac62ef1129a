"""GAP training (SPEC 4.5): the teacher-forced forward, the collator, and ``transformers.Trainer`` around them.

- ``gap_forward`` / ``GapCausalLMOutput``: what
  ``GapQwen2_5_VLForConditionalGeneration.forward(..., latent_targets=...)`` runs.
- ``GapCollator``: samples (with ``hard``) -> a padded batch with labels,
  images and ``latent_targets`` in slot order.
- ``GapTrainer``, ``train``: the Trainer that logs ``text_loss`` and
  ``latent_loss``, and the whole ``gapkern train`` run (imported on first use:
  it pulls in transformers' Trainer and accelerate).
"""
from .collate import GapCollator, question_text
from .forward import GapCausalLMOutput, gap_forward, latent_loss

_LAZY = ("GapTrainer", "train", "load_training_samples", "load_model", "SAMPLES")
__all__ = ["gap_forward", "GapCausalLMOutput", "latent_loss", "GapCollator", "question_text", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
