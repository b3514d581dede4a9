"""Errors of the run store (all `pipekit.PipekitError`s).

::

    PipekitError
    └── StoreError                                 the run database cannot be used
        ├── StoreLockedError                       another process kept it locked
        ├── StoreVersionError                      written by a newer pipekit
        └── RunNotFoundError (also LookupError)    no run (or several) with that id

Every message is one line naming the database and the problem, fit to show a
user as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipekit._errors import PipekitError

__all__ = ["RunNotFoundError", "StoreError", "StoreLockedError", "StoreVersionError"]


class StoreError(PipekitError):
    """The run database cannot be opened, read or written.

    Nothing of the operation that raised it was written: each write is one
    transaction.

    Args:
        message: What is wrong, in one line.
        path: The database concerned, when known.

    Attributes:
        path: The database concerned, when known.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class StoreLockedError(StoreError):
    """Another process held the database locked through every retry.

    Args:
        message: What is wrong, in one line.
        path: The database concerned.
        attempts: How many times the operation was tried.
    """

    def __init__(self, message: str, *, path: str | None = None, attempts: int = 0) -> None:
        super().__init__(message, path=path)
        self.attempts = attempts


class StoreVersionError(StoreError):
    """The database was written by a newer pipekit (its schema version is unknown here).

    Args:
        message: What is wrong, in one line.
        path: The database concerned.
        found: The database's schema version.
        supported: The newest schema version this pipekit knows.
    """

    def __init__(self, message: str, *, path: str | None = None, found: int, supported: int) -> None:
        super().__init__(message, path=path)
        self.found = found
        self.supported = supported


class RunNotFoundError(StoreError, LookupError):
    """No recorded run has this id (or id prefix), or the prefix matches several runs.

    Args:
        message: What is wrong, in one line.
        run_id: The id (or prefix) looked up.
        matches: The ids a prefix matched when it was ambiguous (a few of them).
    """

    def __init__(self, message: str, *, run_id: str, matches: Sequence[str] = (), path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.run_id = run_id
        self.matches = tuple(matches)
