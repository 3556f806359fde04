"""Errors that reach the user as one clear paragraph and an exit code (see docs/commands.md)."""

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad usage or bad input: printed without a traceback, exit code 2."""


def did_you_mean(value: str, options: Iterable[str], n: int = 3) -> str:
    """' Did you mean 'a' or 'b'?' for the options closest to `value`, or ''."""
    close = difflib.get_close_matches(str(value), list(options), n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


class ExportError(RuntimeError):
    """An export ran but its result is wrong (parity, checker): nothing was written; exit code 1."""
