"""Errors of the CI layer (all `pipekit.PipekitError`s)."""

from __future__ import annotations

from collections.abc import Sequence

from pipekit._errors import PipekitError

__all__ = ["CommandError", "CommandFailedError", "CommandNotFoundError"]


class CommandError(PipekitError):
    """Base of the errors a command stage raises.

    Attributes:
        command: The argument list (secrets masked).
    """

    def __init__(self, message: str, *, command: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.command = tuple(command)


class CommandFailedError(CommandError):
    """A command exited with a return code its stage does not count as success.

    Attributes:
        command: The argument list that ran (secrets masked).
        returncode: The exit status (negative: killed by that signal).
        stderr: The tail of its standard error (secrets masked).
    """

    def __init__(self, message: str, *, command: Sequence[str] = (), returncode: int, stderr: str = "") -> None:
        super().__init__(message, command=command)
        self.returncode = returncode
        self.stderr = stderr


class CommandNotFoundError(CommandError, FileNotFoundError):
    """The command's executable is not on PATH (or not executable)."""
