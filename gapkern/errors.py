"""The one error the commands print as a single line (exit status 2), and the argument checks the library
functions share (a ValueError naming the argument)."""


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


def check_positive(name: str, value) -> int:
    """``value`` when it is a positive int, else a ValueError naming the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_samples(samples) -> list:
    """``samples`` when it is a non-empty list of sample dicts (``load_samples``' output), else a ValueError."""
    if not isinstance(samples, (list, tuple)) or not samples or not all(isinstance(s, dict) for s in samples):
        shown = repr(samples) if not isinstance(samples, (list, tuple)) or not samples else f"a list of {len(samples)}"
        raise ValueError(f"samples: expected a non-empty list of samples (load_samples' output), got {shown}")
    return samples
