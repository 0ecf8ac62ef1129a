"""Model integrations, one small file per model family, dispatched by ``config.model_type``."""
from .qwen2_5_vl import GapQwen2_5_VLForConditionalGeneration, GapState, is_patched
from .tokens import add_latent_tokens
from .trace import StepTrace
from . import qwen2_5_vl

__all__ = [
    "patch", "unpatch", "is_patched", "add_latent_tokens", "GapQwen2_5_VLForConditionalGeneration", "GapState",
    "StepTrace",
]

_FAMILIES = {qwen2_5_vl.MODEL_TYPE: qwen2_5_vl}


def _family(model):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise TypeError(f"model: gapkern supports model types {', '.join(_FAMILIES)}; got {model_type!r} "
                        f"({type(model).__name__})")
    return _FAMILIES[model_type]


def patch(model, head=None, config=None):
    """Make a loaded model latent-aware, in place; returns it (see ``qwen2_5_vl.patch``)."""
    return _family(model).patch(model, head=head, config=config)


def unpatch(model):
    """Restore a patched model's original behaviour exactly; returns it."""
    return _family(model).unpatch(model)
