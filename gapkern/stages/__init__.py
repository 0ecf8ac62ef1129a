"""The GAP path's stages side by side, each a library function its command wraps (SPEC section 4).

:mod:`.pca` (fit the head), :mod:`.build` (latent targets), :mod:`.curate` (hard / easy lines),
:mod:`.evaluate` (answers and scores), :mod:`.diagnose` (latent norms); training is :mod:`gapkern.train`.
"""
