"""User-facing errors: a mistake in the user's input, reported as one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input. CLIs print it as one line and exit with status 2."""


class ConfigError(UserError):
    """A configuration value that is unknown, of the wrong type, or out of range."""


def closest(name: str, valid: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest valid name, or '' when none is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def one_line(err: BaseException, *, with_type: bool = False, limit: int = 500) -> str:
    """The last non-empty line of an exception's message (a Ray error's traceback ends there)."""
    text = [line for line in str(err).strip().splitlines() if line.strip()]
    message = text[-1] if text else type(err).__name__
    return (f"{type(err).__name__}: {message}" if with_type else message)[:limit]
