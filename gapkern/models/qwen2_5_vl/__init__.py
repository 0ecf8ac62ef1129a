"""Qwen2.5-VL made latent-aware: the one model family gapkern integrates.

| module | what |
| --- | --- |
| ``patching`` | ``patch`` / ``unpatch`` / ``is_patched`` a loaded model in place |
| ``model`` | ``GapQwen2_5_VLForConditionalGeneration``: the checkpoint that carries the GAP parts; the atomic save |
| ``state`` | ``GapState`` (config, head, ema target) and the calibration targets, built once |
| ``generate`` | the decode loop (``gap_generate``, run as HF's custom decoding loop) |
| ``generate_options`` | HF's generate options: honoured, or refused saying why |
| ``inputs`` | what the loop reads from generate's keywords (and a continued conversation) |
| ``decoder`` | the decode step's state: span rules, device buffers, their host mirror |
| ``graph`` | how the step runs: eagerly, compiled, or replayed from a CUDA graph |
| ``hf_compat`` | every transformers internal the package reads, each pinned by a contract test |
| ``vision_only`` | the vision tower alone, for the stages that need only visual embeddings |

The names the old single module ``gapkern.models.qwen2_5_vl`` had stay importable from here
(``patch`` among them, so the module that defines it is ``patching``: a submodule ``patch`` would be
hidden behind the function of the same name).
"""
from .generate import gap_generate
from .model import CheckpointError, GapQwen2_5_VLForConditionalGeneration
from .patching import is_patched, patch, unpatch
from .state import MODEL_TYPE, GapState, check_ids, row_norms

__all__ = ["MODEL_TYPE", "CheckpointError", "GapQwen2_5_VLForConditionalGeneration", "GapState", "check_ids",
           "gap_generate", "is_patched", "patch", "row_norms", "unpatch"]
