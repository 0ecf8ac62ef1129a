"""gapkern: fused kernels and a latent-aware Qwen2.5-VL generate for GAP visual latent reasoning."""
from . import _moved

_moved.install()  # gapkern.pca, gapkern.targets, ...: the old module names keep working

from . import ops  # noqa: E402
from .config import GapConfig  # noqa: E402
from .head import PCALatentHead  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "GapConfig", "PCALatentHead", "patch", "unpatch"]


def patch(model, head=None, config=None):
    """Make a loaded Qwen2.5-VL model latent-aware and fast, in place; returns it."""
    from .models import patch as _patch

    return _patch(model, head=head, config=config)


def unpatch(model):
    """Restore a patched model's original behaviour exactly; returns it."""
    from .models import unpatch as _unpatch

    return _unpatch(model)
