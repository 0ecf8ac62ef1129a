"""Model integrations, one small file per model family."""


def patch(model, head=None, config=None):
    raise NotImplementedError("gapkern.patch: Qwen2.5-VL integration not implemented yet")


def unpatch(model):
    raise NotImplementedError("gapkern.unpatch: Qwen2.5-VL integration not implemented yet")
