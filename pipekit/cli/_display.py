"""Showing a run as it happens: a live table on a terminal, one line per event elsewhere, JSON for machines."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final, Protocol, TextIO

import attrs
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

import pipekit as pk
from pipekit.ci import OutputLine, PrintHook

__all__ = [
    "Display",
    "JsonDisplay",
    "LiveDisplay",
    "PlainDisplay",
    "RunView",
    "StageView",
    "error_text",
    "response_document",
    "seconds",
    "summary_lines",
    "summary_table",
    "write_line",
]

#: How each state of a stage looks: symbol, style, words.
LOOKS: Final[Mapping[str, tuple[str, str, str]]] = {
    "pending": ("·", "dim", "pending"),
    "running": ("▶", "yellow", "running"),
    "retrying": ("↻", "yellow", "retrying"),
    "succeeded": ("✔", "green", "succeeded"),
    "restored": ("✔", "green", "restored"),
    "failed": ("✘", "bold red", "failed"),
    "timed_out": ("⏱", "bold red", "timed out"),
    "cancelled": ("⊘", "magenta", "cancelled"),
    "skipped": ("↷", "dim", "skipped"),
    "rolling_back": ("↺", "magenta", "rolling back"),
    "rolled_back": ("↺", "blue", "rolled back"),
    "rollback_failed": ("✘", "bold red", "rollback failed"),
    "interrupted": ("⊘", "magenta", "interrupted"),
}

#: How each final state of a run looks: style, words.
RUN_LOOKS: Final[Mapping[str, tuple[str, str]]] = {
    "succeeded": ("bold green", "succeeded"),
    "failed": ("bold red", "FAILED"),
    "timed_out": ("bold red", "TIMED OUT"),
    "cancelled": ("bold magenta", "CANCELLED"),
    "interrupted": ("bold magenta", "INTERRUPTED"),
    "running": ("yellow", "running"),
}


def seconds(duration: float | None) -> str:
    """A duration for people: ``0.52s``, ``3m07.2s``; ``-`` when unknown."""
    if duration is None:
        return "-"
    if duration < 60:
        return f"{duration:.2f}s"
    minutes, rest = divmod(duration, 60)
    return f"{int(minutes)}m{rest:04.1f}s"


def error_text(error: BaseException | None) -> str | None:
    """``Type: first line of the message`` of ``error`` (None for None)."""
    if error is None:
        return None
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    more = " ..." if len(lines) > 1 else ""
    return f"{type(error).__name__}: {lines[0]}{more}"


@attrs.define(eq=False)
class StageView:
    """What the display knows of one stage (mutable, updated from events).

    Attributes:
        name: The stage's name (``inner/stage`` for stages of nested pipelines).
        state: A key of `LOOKS`.
        attempt: The attempt running or last made.
        started: When it started (seconds since the epoch).
        duration: Seconds it took, once finished.
        detail: Its error, or why it was skipped.
        tail: The last lines its commands printed.
    """

    name: str
    state: str = "pending"
    attempt: int = 0
    started: float | None = None
    duration: float | None = None
    detail: str = ""
    tail: deque[str] = attrs.field(factory=deque)

    def elapsed(self, now: float) -> float | None:
        """Seconds it took, or has been running for at ``now``."""
        if self.duration is not None:
            return self.duration
        if self.started is not None and self.state in ("running", "retrying"):
            return max(now - self.started, 0.0)
        return None


class RunView:
    """The state of one run, built from its events, for a display to draw.

    Args:
        pipeline: The pipeline (its stages are listed as pending from the start).
        tail_lines: Lines of command output kept per stage.
    """

    def __init__(self, pipeline: pk.Pipeline, *, tail_lines: int = 5) -> None:
        self.pipeline = pipeline.name
        self.tail_lines = tail_lines
        self.stages: dict[str, StageView] = {}
        for name in pipeline.stage_names:
            self._stage(name)
        self._prefixes: dict[str, str] = {pipeline.name: ""}
        self.started: float | None = None
        self.state = "pending"
        self.duration: float | None = None
        self.error: str | None = None

    def _stage(self, name: str) -> StageView:
        view = self.stages.get(name)
        if view is None:
            view = self.stages[name] = StageView(name=name, tail=deque(maxlen=self.tail_lines))
        return view

    def apply(self, event: pk.Event) -> None:
        """Update the view with ``event``."""
        if isinstance(event, pk.PipelineStarted):
            if event.parent is None:
                self.started = event.timestamp
                self.state = "running"
            else:
                self._prefixes[event.pipeline] = f"{self._prefixes.get(event.parent, '')}{event.pipeline}/"
            return
        if isinstance(event, pk.PipelineFinished):
            if event.parent is None:
                self.state = event.status.value
                self.duration = event.duration
                self.error = error_text(event.error)
            return
        prefix = self._prefixes.get(event.pipeline, "")
        if isinstance(event, pk.RollbackStarted):
            for name in event.stages:
                self._stage(prefix + name).state = "rolling_back"
            return
        if event.stage is None:
            return
        view = self._stage(prefix + event.stage)
        match event:
            case OutputLine():
                view.tail.append(event.line if event.stream == "stdout" else f"! {event.line}")
                if event.attempt > view.attempt and view.state == "retrying":
                    view.state, view.attempt = "running", event.attempt
            case pk.StageStarted():
                view.state = "running"
                view.attempt = max(event.attempt, 1)
                view.started = event.timestamp
                view.duration = None
            case pk.StageRetrying():
                view.state = "retrying"
                view.attempt = event.attempt
                view.detail = f"attempt {event.attempt}: {error_text(event.error)}"
            case pk.StageSucceeded():
                view.state = "restored" if event.restored else "succeeded"
                view.attempt = event.attempt
                view.duration = event.duration
                view.detail = "output restored from the earlier run" if event.restored else ""
            case pk.StageFailed():
                view.state = event.status.value
                view.attempt = event.attempt
                view.duration = event.duration
                view.detail = error_text(event.error) or ""
            case pk.StageCancelled():
                view.state = "cancelled"
                if view.started is not None:
                    view.duration = max(event.timestamp - view.started, 0.0)
                view.detail = event.reason
            case pk.StageSkipped():
                view.state = "skipped"
                view.detail = event.reason
            case pk.StageRolledBack():
                view.state = "rolled_back"
            case pk.StageRollbackFailed():
                view.state = "rollback_failed"
                view.detail = f"rollback: {error_text(event.error)}"
            case _:
                pass

    def render(self, now: float) -> RenderableType:
        """The live table at time ``now`` (seconds since the epoch), with the running stages' output."""
        table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
        width = max((len(name) for name in self.stages), default=5)
        table.add_column("", width=1, no_wrap=True)
        table.add_column("stage", no_wrap=True, min_width=min(width, 24), overflow="ellipsis")
        table.add_column("status", no_wrap=True, min_width=15)
        table.add_column("try", justify="right", no_wrap=True, min_width=3)
        table.add_column("time", justify="right", no_wrap=True, min_width=7)
        table.add_column("", overflow="ellipsis", no_wrap=True, ratio=1)
        for view in self.stages.values():
            symbol, style, words = LOOKS.get(view.state, ("?", "", view.state))
            table.add_row(
                Text(symbol, style=style),
                Text(view.name),
                Text(words, style=style),
                str(view.attempt) if view.attempt else "",
                seconds(view.elapsed(now)) if view.elapsed(now) is not None else "",
                Text(view.detail, style="dim"),
            )
        parts: list[RenderableType] = [self._title(now), table]
        for view in self.stages.values():
            if view.state in ("running", "retrying") and view.tail:
                for line in view.tail:
                    text = Text(f"  {view.name} │ ", style="dim")
                    text.append(line, style="red" if line.startswith("! ") else "")
                    text.no_wrap = True
                    text.overflow = "ellipsis"
                    parts.append(text)
        return Group(*parts)

    def _title(self, now: float) -> Text:
        style, words = RUN_LOOKS.get(self.state, ("", self.state))
        elapsed = self.duration if self.duration is not None else (now - self.started if self.started else 0.0)
        title = Text("pipeline ", style="bold")
        title.append(self.pipeline, style="bold cyan")
        title.append("  ")
        title.append(words, style=style)
        title.append(f"  {seconds(max(elapsed, 0.0))}", style="dim")
        return title


# -- the end of a run ---------------------------------------------------------------


def _stage_state(result: pk.StageResult) -> str:
    if result.rollback_error is not None:
        return "rollback_failed"
    if result.rolled_back:
        return "rolled_back"
    if result.status is pk.Status.SUCCEEDED and result.attempts == 0 and result.reason:
        return "restored"
    return result.status.value


def _stage_detail(result: pk.StageResult) -> str:
    parts = []
    if result.error is not None:
        parts.append(error_text(result.error) or "")
    elif result.reason:
        parts.append(result.reason)
    if result.rollback_error is not None:
        parts.append(f"rollback failed: {error_text(result.rollback_error)}")
    return "; ".join(parts)


def response_document(
    response: pk.PipelineResponse,
    *,
    run_id: str | None,
    retry_of: str | None = None,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The outcome of a run as plain JSON data (what ``--json`` prints).

    Args:
        response: The run's response.
        run_id: Its id in the run history (None when not recorded).
        retry_of: The recorded run it retried.
        interrupted: Whether the user interrupted it.

    Returns:
        A dict of JSON types.
    """
    return {
        "run_id": run_id,
        "request_id": response.id,
        "pipeline": response.pipeline,
        "status": response.status.value,
        "ok": response.ok,
        "interrupted": interrupted,
        "retry_of": retry_of,
        "started_at": response.started_at.isoformat(),
        "finished_at": response.finished_at.isoformat(),
        "duration": response.duration,
        "error": error_text(response.error),
        "rollback_error": error_text(response.error.rollback_error) if response.error is not None else None,
        "stages": [
            {
                "name": result.name,
                "status": result.status.value,
                "restored": _stage_state(result) == "restored",
                "attempts": result.attempts,
                "duration": result.duration,
                "error": error_text(result.error),
                "reason": result.reason,
                "rolled_back": result.rolled_back,
                "rollback_error": error_text(result.rollback_error),
            }
            for result in response.stages.values()
        ],
    }


def _outcome(response: pk.PipelineResponse) -> str:
    words = RUN_LOOKS.get(response.status.value, ("", response.status.value))[1]
    return f"pipeline {response.pipeline!r} {words} in {seconds(response.duration)}"


def summary_lines(response: pk.PipelineResponse) -> list[str]:
    """The end-of-run summary as plain lines: the outcome, then one line per stage, then the error."""
    lines = [_outcome(response)]
    results = list(response.stages.values())
    width = max((len(r.name) for r in results), default=0)
    for result in results:
        words = LOOKS.get(_stage_state(result), ("", "", result.status.value))[2]
        tries = f"{result.attempts} attempt{'' if result.attempts == 1 else 's'}"
        detail = _stage_detail(result)
        line = f"  {result.name:<{width}}  {words:<15}  {tries:<10}  {seconds(result.duration):>8}"
        lines.append(f"{line}  {detail}" if detail else line)
    if response.error is not None:
        lines.append(f"error: {error_text(response.error)}")
    return lines


def summary_table(response: pk.PipelineResponse) -> Table:
    """The end-of-run summary as a rich table (titled with the outcome)."""
    style = RUN_LOOKS.get(response.status.value, ("", ""))[0]
    table = Table(title=Text(_outcome(response), style=style), title_justify="left", box=box.ROUNDED)
    table.add_column("stage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("attempts", justify="right")
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("error / reason", overflow="fold")
    for result in response.stages.values():
        symbol, look, words = LOOKS.get(_stage_state(result), ("?", "", result.status.value))
        table.add_row(
            Text(result.name),
            Text(f"{symbol} {words}", style=look),
            str(result.attempts),
            seconds(result.duration),
            Text(_stage_detail(result)),
        )
    return table


# -- displays -------------------------------------------------------------------------


def write_line(out: TextIO, text: str) -> bool:
    """Write ``text`` and a newline to ``out`` and flush; False if its reader has gone away.

    When the reader of a pipe has gone (``pipekit run FILE | head``), the
    run must go on (and be recorded, and rolled back if it fails) unseen:
    the pipe is replaced by ``/dev/null``, so that later writes, and the
    interpreter's last flush, are quietly dropped.
    """
    try:
        out.write(text + "\n")
        out.flush()
    except BrokenPipeError:
        try:
            fd = out.fileno()
        except (OSError, ValueError):  # not a real file: nothing to redirect
            return False
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        return False
    return True


class Display(Protocol):
    """What `pipekit run` and `pipekit retry` show while a run goes on, and at its end."""

    def start(self) -> None:
        """The run was submitted."""

    def event(self, event: pk.Event) -> None:
        """One event of the run."""

    def tick(self) -> None:
        """Called a few times a second while the run goes on."""

    def note(self, message: str) -> None:
        """A message for the user (an interruption, say)."""

    def stop(self) -> None:
        """The run's events ended."""

    def finish(self, response: pk.PipelineResponse, *, run_id: str | None, notes: Iterable[str] = ()) -> None:
        """Show the outcome; ``notes`` are lines about it (where it was recorded...)."""


class PlainDisplay:
    """One plain line per event (no colours, no cursor movement), for CI logs and pipes.

    Command output lines are shown as ``[pipeline] stage | line`` (``!`` for
    standard error). The summary is plain lines too.

    Args:
        file: Where to write (``sys.stdout`` at each write by default).
    """

    def __init__(self, file: TextIO | None = None) -> None:
        self._hook = PrintHook(file)
        self._file = file

    def _write(self, text: str) -> None:
        write_line(sys.stdout if self._file is None else self._file, text)

    def start(self) -> None:
        """Nothing to prepare."""

    def event(self, event: pk.Event) -> None:
        """Write the event's line."""
        self._write(self._hook.format(event))

    def tick(self) -> None:
        """Nothing to refresh."""

    def note(self, message: str) -> None:
        """Write the message."""
        self._write(message)

    def stop(self) -> None:
        """Nothing to tear down."""

    def finish(self, response: pk.PipelineResponse, *, run_id: str | None, notes: Iterable[str] = ()) -> None:
        """Write the summary lines and the notes."""
        for line in (*summary_lines(response), *notes):
            self._write(line)


class LiveDisplay:
    """A live table of the stages on a terminal, redrawn in place, then a summary table.

    Args:
        console: The terminal's console.
        view: The run's state.
        clock: Seconds since the epoch (for running stages' times).
    """

    def __init__(self, console: Console, view: RunView, *, clock: Callable[[], float] = time.time) -> None:
        self.console = console
        self.view = view
        self._clock = clock
        self._live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False)
        self._live.update(self._render())

    def _render(self) -> RenderableType:
        return self.view.render(self._clock())

    def start(self) -> None:
        """Start drawing."""
        self._live.start()

    def event(self, event: pk.Event) -> None:
        """Update the view (drawn at the next tick, or now for a stage's change of state)."""
        self.view.apply(event)
        if not isinstance(event, OutputLine):
            self.tick()

    def tick(self) -> None:
        """Redraw."""
        self._live.update(self._render(), refresh=True)

    def note(self, message: str) -> None:
        """Print the message above the live table."""
        self._live.console.print(Text(message, style="bold yellow"))

    def stop(self) -> None:
        """Draw the final state and stop redrawing."""
        self._live.update(self._render(), refresh=True)
        self._live.stop()

    def finish(self, response: pk.PipelineResponse, *, run_id: str | None, notes: Iterable[str] = ()) -> None:
        """Print the summary table and the notes."""
        self.console.print(summary_table(response))
        for line in notes:
            self.console.print(Text(line, style="dim"))


class JsonDisplay:
    """Nothing while the run goes on; one JSON document at its end.

    Args:
        file: Where to write (``sys.stdout`` at the end by default).
        retry_of: The recorded run this run retries.
    """

    def __init__(self, file: TextIO | None = None, *, retry_of: str | None = None) -> None:
        self._file = file
        self.retry_of = retry_of
        self.interrupted = False

    def start(self) -> None:
        """Nothing to show."""

    def event(self, event: pk.Event) -> None:
        """Nothing to show."""

    def tick(self) -> None:
        """Nothing to show."""

    def note(self, message: str) -> None:
        """Nothing to show (notes would not be JSON)."""

    def stop(self) -> None:
        """Nothing to tear down."""

    def finish(self, response: pk.PipelineResponse, *, run_id: str | None, notes: Iterable[str] = ()) -> None:
        """Write the document."""
        out = sys.stdout if self._file is None else self._file
        document = response_document(response, run_id=run_id, retry_of=self.retry_of, interrupted=self.interrupted)
        write_line(out, json.dumps(document, indent=2, default=str))


def iso(value: datetime | None) -> str:
    """A time for people, local and to the second (``-`` when unknown)."""
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
