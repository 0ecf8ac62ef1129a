"""FSDP units for a Gap Qwen2.5-VL: what ``gapkern train -- --fsdp "full_shard auto_wrap"`` shards as one piece.

accelerate's transformer-based auto-wrap makes a unit of every module whose class is named in
``fsdp_config["transformer_layer_cls_to_wrap"]`` (default: the model's ``_no_split_modules``, the decoder
layer and the vision block); the root unit takes what no unit claims. The Gap model adds the head:
:func:`wrap_classes` names ``PCALatentHead`` too, so its weight and bias are gathered by its own forward
(the latent loss calls ``head(...)``, never ``head.weight`` from outside) and its gradients reduce as soon
as its backward is done, apart from the 0.5-1 G parameters of the root's embeddings and ``lm_head``.
Buffers are never sharded (FSDP shards parameters only): ``gap.tau_ema`` and the head's ``basis`` /
``mean`` / ``sigma`` stay whole on every rank, in the root unit and the head's unit.
"""
from __future__ import annotations

from torch import nn

__all__ = ["wrap_classes", "fsdp_units", "use_gap_wrap"]

TRANSFORMER_BASED_WRAP = "TRANSFORMER_BASED_WRAP"  # accelerate's FSDP_AUTO_WRAP_POLICY[0], the Trainer's default


def wrap_classes(model: nn.Module) -> list[str]:
    """The class names that get a unit of their own: the model's ``_no_split_modules`` it holds, and its head's."""
    present = {type(m).__name__ for m in model.modules()}
    # sorted: transformers builds _no_split_modules as a set, and the names are saved with the arguments
    names = sorted(name for name in getattr(model, "_no_split_modules", None) or () if name in present)
    state = model._modules.get("gap")
    head = None if state is None else state.head
    if head is not None and type(head).__name__ not in names:
        names.append(type(head).__name__)
    return names


def fsdp_units(model: nn.Module, classes: list[str] | None = None) -> list[str]:
    """The names of the modules the transformer-based policy with ``classes`` (default :func:`wrap_classes`)
    makes a unit of, in ``named_modules`` order; ``""`` is the root unit, always there."""
    wanted = tuple(wrap_classes(model) if classes is None else classes)
    return [""] + [name for name, module in model.named_modules()
                   if name and type(getattr(module, "_checkpoint_wrapped_module", module)).__name__ in wanted]


def use_gap_wrap(args, model: nn.Module) -> list[str] | None:
    """Give an FSDP run (``args.fsdp`` set) the Gap units, unless ``fsdp_config`` names its own classes or
    another policy. Call before the Trainer is built (it makes accelerate's plugin); returns the classes set."""
    if not args.fsdp:
        return None
    config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
    if config.get("transformer_layer_cls_to_wrap") or config.get("auto_wrap_policy",
                                                                   TRANSFORMER_BASED_WRAP) != TRANSFORMER_BASED_WRAP:
        return None
    classes = wrap_classes(model)
    config["transformer_layer_cls_to_wrap"] = classes  # saved with the arguments (training_args.bin)
    plugin = getattr(args, "fsdp_plugin_args", None)
    if isinstance(plugin, dict) and plugin.get("auto_wrap_policy", TRANSFORMER_BASED_WRAP) == TRANSFORMER_BASED_WRAP:
        plugin["transformer_cls_names_to_wrap"] = ",".join(classes)
    return classes
