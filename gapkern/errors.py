"""The one error the commands print as a single line (exit status 2)."""


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""
