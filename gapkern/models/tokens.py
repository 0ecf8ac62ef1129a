"""Latent tokens: add a profile's tokens to a tokenizer and make room for them in the model."""
from __future__ import annotations

from ..config import ADD_ORDER, PROFILES, GapConfig


def add_latent_tokens(tokenizer, model=None, profile: str = "gap", **config_kw) -> GapConfig:
    """Add the profile's five special tokens (start, end, pad, description open / close).

    Missing tokens are added in the order the profile's own code adds them
    (Monet: pad, start, end, open, close), so their ids match its checkpoints.
    Tokens the tokenizer already has keep their ids. When ``model`` is given
    and its embedding table is smaller than the tokenizer, the embeddings (and
    an untied LM head) are resized. Returns the profile's :class:`GapConfig`
    (``config_kw`` sets its other fields).
    """
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
    vocab = tokenizer.get_vocab()
    tokens = [PROFILES[profile][i] for i in ADD_ORDER[profile]]
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return GapConfig.from_tokenizer(tokenizer, profile=profile, **config_kw)
