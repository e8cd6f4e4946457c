"""Errors for people: bad input to a command or a benchmark run, as one line naming the argument."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UsageError(ValueError):
    """Bad input to a command (the message names the argument and says what it accepts). ``vtoken``'s ``main`` prints
    it as one line and exits with status 2; library callers can catch it as a ``ValueError``."""


@contextmanager
def user_input(what: str) -> Iterator[None]:
    """Turn the ``ValueError`` / ``TypeError`` / ``OSError`` that checking ``what`` (an argument) raises into a
    :class:`UsageError` naming it. Wrap only input checks, never the work itself, so that bugs keep their traceback."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as err:
        text = str(err)
        raise UsageError(text if text.startswith(what) else f"{what}: {text}") from err
