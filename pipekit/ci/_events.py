"""Events the CI layer adds to a run's stream."""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs

from pipekit._events import Event

__all__ = ["OutputLine"]


@attrs.frozen(kw_only=True)
class OutputLine(Event):
    """One line a command printed, as it was printed (secrets masked).

    Emitted by [`CommandStage`][pipekit.ci.CommandStage] for every line of
    its standard output and error, so a progress display or a server can
    follow a build live. ``stage`` and ``attempt`` say whose output it is.

    Attributes:
        stream: ``"stdout"`` or ``"stderr"``.
        line: The line, without its line ending (long lines arrive in pieces).
    """

    kind: ClassVar[str] = "output_line"
    stream: Literal["stdout", "stderr"] = "stdout"
    line: str = ""
