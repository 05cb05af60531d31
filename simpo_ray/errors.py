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
