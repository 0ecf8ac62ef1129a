"""Model integrations: one package per model family (Qwen2.5-VL is the one), and what the families share.

``patch`` / ``unpatch`` are Qwen2.5-VL's: with a single family there is no
dispatch layer (``patch`` names the model type it expects when handed
another). ``tokens`` (adding a profile's tokens) and ``trace`` (the decode
loop's opt-in instrumentation) do not depend on the family.
"""
from . import qwen2_5_vl
from .qwen2_5_vl import GapQwen2_5_VLForConditionalGeneration, GapState, is_patched, patch, unpatch
from .tokens import add_latent_tokens
from .trace import StepTrace

__all__ = [
    "patch", "unpatch", "is_patched", "add_latent_tokens", "GapQwen2_5_VLForConditionalGeneration", "GapState",
    "StepTrace",
]
