"""The GAP path's data, each idea in one module (SPEC 4.1, 4.2, 4.4).

- :mod:`.samples`: the sample file (``load_samples``), the teacher response, the question text.
- :mod:`.images`: image files read and resized as Qwen2.5-VL's processor does, as pixel inputs.
- :mod:`.embeddings`: the visual input embeddings (merger outputs) of images.
- :mod:`.prompts`: chat prompts of samples (batched, left-padded) and of one image.
- :mod:`.targets`: latent targets (``pool_targets``) and their safetensors shards.

Every name the flat ``gapkern.data`` module had is re-exported here.
"""
from .embeddings import image_embeddings, merged_grid, sample_images, visual_embeddings
from .images import image_inputs
from .samples import (ANSWER_FORMAT, CATEGORIES, SampleError, load_samples, question_text, teacher_response,
                      uses_latents)
from .targets import TargetReader, TargetWriter, latent_keys, pool_targets

__all__ = ["SampleError", "load_samples", "teacher_response", "latent_keys", "pool_targets", "image_inputs",
           "merged_grid", "visual_embeddings", "image_embeddings", "sample_images", "question_text", "uses_latents",
           "TargetWriter", "TargetReader", "CATEGORIES", "ANSWER_FORMAT"]
