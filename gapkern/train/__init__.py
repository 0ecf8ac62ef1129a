"""GAP training (SPEC 4.5): the teacher-forced forward, the collator, and ``transformers.Trainer`` around them.

- ``gap_forward`` / ``GapCausalLMOutput``: what
  ``GapQwen2_5_VLForConditionalGeneration.forward(..., latent_targets=...)`` runs.
- ``GapCollator``: samples (with ``hard``) -> a padded batch with labels,
  images and ``latent_targets`` in slot order.
- ``train``, ``attach_gap``, ``GapTrainer``, ...: the Trainer run behind
  ``gapkern train`` (imported on first use: it pulls in transformers' Trainer
  and accelerate).
- ``wrap_classes``, ``fsdp_units``, ``use_gap_wrap``: the FSDP units of a Gap model (``--fsdp``: the
  decoder layers, the vision blocks and the head each shard as one).
"""
from .collate import GapCollator
from .forward import GapCausalLMOutput, gap_forward, latent_loss
from .fsdp import fsdp_units, use_gap_wrap, wrap_classes

_LAZY = ("GapTrainer", "train", "attach_gap", "apply_curation", "check_targets", "choose_trainable", "merge_lora",
         "training_arguments", "KEEP_HEAD")
__all__ = ["gap_forward", "GapCausalLMOutput", "latent_loss", "GapCollator", "wrap_classes", "fsdp_units",
           "use_gap_wrap", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
