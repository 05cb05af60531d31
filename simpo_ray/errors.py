"""User-facing errors: a mistake in the user's input, reported as one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input. CLIs print it as one line and exit with status 2."""


class SearchStopped(Exception):
    """A search that stopped before its end for a reason other than Ctrl-C (a nearly full disk),
    after writing its partial tables. CLIs print it as one line and exit with status 1."""


class ConfigError(UserError):
    """A configuration value that is unknown, of the wrong type, or out of range."""


def closest(name: str, valid: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest valid name, or '' when none is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def one_line(err: BaseException, *, first: bool = False, innermost: bool = False, with_type: bool = False,
             limit: int = 500) -> str:
    """An exception's message as one line, the one helper for every error shown to a user: the
    last non-empty line (a Ray error's traceback ends there), or the first with `first` (a
    library's summary line); `innermost`: of the innermost cause (`datasets` wraps the
    informative pyarrow error)."""
    while innermost and err.__cause__ is not None:
        err = err.__cause__
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    message = (text[0] if first else text[-1]) if text else type(err).__name__
    return (f"{type(err).__name__}: {message}" if with_type else message)[:limit]
