"""Errors a user can cause and fix. The CLIs print these as one line, no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: the message says what was wrong, where, and what is allowed."""


class DatasetError(UserError):
    """A dataset file that is missing, malformed or inconsistent."""

    def __init__(self, path: object, key: str | None, problem: str):
        where = f"{path}" + (f" [{key}]" if key else "")
        super().__init__(f"dataset {where}: {problem}")
        self.path, self.key, self.problem = path, key, problem


def unknown(kind: str, name: str, known: Iterable[str], where: str = "") -> UserError:
    """An 'unknown <kind>' error naming the closest known name and listing all of them."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    loc = f"{where}: " if where else ""
    return UserError(f"{loc}unknown {kind} '{name}'{hint}; known: {', '.join(known)}")


def need(ok: bool, where: str, message: str) -> None:
    """Raise UserError('where: message') (just the message when `where` is empty) unless ok."""
    if not ok:
        raise UserError(f"{where}: {message}" if where else message)
