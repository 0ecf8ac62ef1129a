"""GapConfig: the ids and settings of latent spans (SPEC sections 3 and 5)."""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass

# profile -> (start, end, pad, description open, description close)
PROFILES = {
    "gap": ("<latent>", "</latent>", "<latent_pad>", "<parser>", "</parser>"),
    "monet": ("<abs_vis_token>", "</abs_vis_token>", "<abs_vis_token_pad>", "<observation>", "</observation>"),
}
# profile -> its own code's order of adding the tokens (so the ids match its checkpoints: SPEC section 3;
# Monet's src/main.py adds the pad first)
ADD_ORDER = {"gap": (0, 1, 2, 3, 4), "monet": (2, 0, 1, 3, 4)}
# profile -> (span layout, K): the defaults of GapConfig.span_layout and latent_budget (SPEC section 3)
PROFILE_DEFAULTS = {"gap": ("gap", 16), "monet": ("monet", 10)}
SPAN_LAYOUTS = ("gap", "monet")
CALIBRATIONS = ("none", "rms", "ema")
_IDS = ("latent_start_id", "latent_end_id", "latent_pad_id")


def _check_type(name, value, kind):
    """``kind`` int: an int, not a bool; float: an int or float, not a bool; str: a str."""
    ok = isinstance(value, str) if kind is str else (
        not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float)))
    if not ok:
        expected = {int: "an int", float: "a number", str: "a string"}[kind]
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")


KEEP_HEAD = "checkpoint"  # a head argument meaning: keep the one a gapkern checkpoint brought


# Frozen: the decode loop reads these once per generate call and keeps a decoder keyed by them, so a
# field changed in place would reach it unchecked; dataclasses.replace makes a new, checked config.
@dataclass(frozen=True)
class GapConfig:
    latent_start_id: int
    latent_end_id: int
    latent_pad_id: int
    latent_budget: int | None = None  # None: the profile's K
    calibration: str = "none"
    ema_decay: float = 0.99
    eps: float = 1e-6
    profile: str = "gap"
    span_layout: str | None = None  # None: the profile's layout (configs saved before the field load so)

    def __post_init__(self):
        _check_type("profile", self.profile, str)
        if self.profile not in PROFILES:
            raise ValueError(f"profile: expected one of {', '.join(PROFILES)}, got {self.profile!r}")
        layout, budget = PROFILE_DEFAULTS[self.profile]
        for name, default in (("span_layout", layout), ("latent_budget", budget)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for field in dataclasses.fields(self):
            kind = {"int": int, "float": float, "str": str}[field.type.split(" ")[0]]
            _check_type(field.name, getattr(self, field.name), kind)
        for name in _IDS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {getattr(self, name)!r}")
        start, end, pad = (getattr(self, name) for name in _IDS)
        if len({start, end, pad}) < 3:
            raise ValueError(f"latent_start_id, latent_end_id, latent_pad_id: expected three different ids, "
                             f"got {start}, {end}, {pad}")
        if self.latent_budget < 1:
            raise ValueError(f"latent_budget: expected at least 1 latent per span, got {self.latent_budget}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration: expected one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps: expected a positive finite number, got {self.eps!r}")
        if self.span_layout not in SPAN_LAYOUTS:
            raise ValueError(f"span_layout: expected one of {', '.join(SPAN_LAYOUTS)}, got {self.span_layout!r}")
        for name in ("ema_decay", "eps"):  # 0 and 0.0 are one setting: store floats, so to_dict is stable
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_tokenizer(cls, tokenizer, profile: str = "gap", **kw) -> "GapConfig":
        """Fill the start / end / pad ids from the profile's token strings."""
        if profile not in PROFILES:
            raise ValueError(f"profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
        if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        ids = {}
        for field, token in zip(_IDS, PROFILES[profile]):
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
    def from_dict(cls, data: Mapping) -> "GapConfig":
        """The inverse of :meth:`to_dict`. Every key must be a field (a misspelt one is an error,
        not a silent default), and the three ids are required."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data: expected a dict of GapConfig fields, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; the fields are {', '.join(names)}"
                raise ValueError(f"data: unknown GapConfig field {key!r}{hint}")
        missing = [name for name in _IDS if name not in data]
        if missing:
            raise ValueError(f"data: missing GapConfig field(s) {', '.join(missing)}")
        return cls(**data)
