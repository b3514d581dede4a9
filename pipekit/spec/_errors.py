"""[`SpecError`][pipekit.spec.SpecError]: what is wrong with a pipeline file, and where."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipekit._errors import PipekitError

__all__ = ["SpecError"]


class SpecError(PipekitError, ValueError):
    """A pipeline file (or spec) is malformed or invalid.

    Each problem names the file, the line and the field path when known::

        pipeline.yaml:12: stages[2].timeout: expected a number of seconds, got "ten"

    When a file has several problems they are all reported at once: `errors`
    holds one `SpecError` per problem, and ``str()`` is one such line per
    problem. The attributes of the aggregate are those of its first problem.

    Args:
        message: What is wrong, in one line, without the location.
        source: The file name (``"<string>"`` for text given directly).
        path: The field path (``stages[2].timeout``), or None for the whole file.
        line: The 1-based line, when known.
        errors: The individual problems, when this error aggregates several.

    Attributes:
        message: What is wrong, without the location.
        source: The file name.
        path: The field path, or None.
        line: The 1-based line, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str = "<string>",
        path: str | None = None,
        line: int | None = None,
        errors: Sequence[SpecError] = (),
    ) -> None:
        self.message = message
        self.source = source
        self.path = path
        self.line = line
        self._problems: tuple[SpecError, ...] = tuple(errors) if len(errors) > 1 else ()
        super().__init__(self._text())

    @classmethod
    def aggregate(cls, problems: Sequence[SpecError]) -> SpecError:
        """One error reporting every problem of ``problems`` (non-empty); a single problem is returned as is."""
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        return cls(first.message, source=first.source, path=first.path, line=first.line, errors=problems)

    @property
    def errors(self) -> tuple[SpecError, ...]:
        """Every problem this error reports, one `SpecError` each (just itself when there is one)."""
        return self._problems or (self,)

    @property
    def location(self) -> str:
        """Where the problem is: ``pipeline.yaml:12: stages[2].timeout``."""
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return where if self.path is None else f"{where}: {self.path}"

    def _text(self) -> str:
        if self._problems:
            return "\n".join(p._text() for p in self._problems)
        return f"{self.location}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.message, self.source, self.path, self.line, self._problems))


def _rebuild(message: str, source: str, path: str | None, line: int | None, errors: tuple[SpecError, ...]) -> SpecError:
    return SpecError(message, source=source, path=path, line=line, errors=errors)
