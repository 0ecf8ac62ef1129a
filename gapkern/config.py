"""GapConfig: the ids and settings of latent spans (SPEC sections 3 and 5)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# profile -> (start, end, pad, description open, description close)
PROFILES = {
    "gap": ("<latent>", "</latent>", "<latent_pad>", "<parser>", "</parser>"),
    "monet": ("<abs_vis_token>", "</abs_vis_token>", "<abs_vis_token_pad>", "<observation>", "</observation>"),
}
CALIBRATIONS = ("none", "rms", "ema")


@dataclass
class GapConfig:
    latent_start_id: int
    latent_end_id: int
    latent_pad_id: int
    latent_budget: int = 16
    calibration: str = "none"
    ema_decay: float = 0.99
    eps: float = 1e-6
    profile: str = "gap"

    def __post_init__(self):
        for name in ("latent_start_id", "latent_end_id", "latent_pad_id", "latent_budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
        if self.latent_budget < 1:
            raise ValueError(f"latent_budget: expected at least 1 latent per span, got {self.latent_budget}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration: expected one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")
        if not self.eps > 0:
            raise ValueError(f"eps: expected a positive number, got {self.eps!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile: expected one of {', '.join(PROFILES)}, got {self.profile!r}")

    @classmethod
    def from_tokenizer(cls, tokenizer, profile: str = "gap", **kw) -> "GapConfig":
        """Fill the start / end / pad ids from the profile's token strings."""
        if profile not in PROFILES:
            raise ValueError(f"profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
        ids = {}
        for field, token in zip(("latent_start_id", "latent_end_id", "latent_pad_id"), PROFILES[profile]):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == getattr(tokenizer, "unk_token_id", object()):
                raise ValueError(
                    f"tokenizer: has no token {token!r} of profile {profile!r}; "
                    "add the profile's tokens first (gapkern.models.add_latent_tokens)"
                )
            ids[field] = tid
        return cls(**{**ids, **kw, "profile": profile})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GapConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
