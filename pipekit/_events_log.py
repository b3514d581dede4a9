"""A bounded event history that any number of readers follow at their own pace."""

from __future__ import annotations

from collections import deque

import anyio
import structlog

from ._events import Event

__all__ = ["EventLog", "EventStream"]

_log = structlog.get_logger("pipekit")


class EventLog:
    """Keeps the last ``maxlen`` events; readers that fall further behind skip ahead.

    Writers never wait for readers, so a slow subscriber cannot stall a run.
    A reader that lost events is told so: `EventStream.dropped` counts
    them and a ``pipekit.events.dropped`` warning is logged.
    """

    __slots__ = ("_base", "_buf", "_wake", "closed", "maxlen", "name")

    def __init__(self, maxlen: int, name: str) -> None:
        if maxlen < 1:
            raise ValueError(f"an event history holds at least 1 event, got {maxlen}")
        self._buf: deque[Event] = deque(maxlen=maxlen)
        self._base = 0
        self._wake: anyio.Event | None = None
        self.closed = False
        self.maxlen = maxlen
        self.name = name

    @property
    def end(self) -> int:
        return self._base + len(self._buf)

    def append(self, event: Event) -> None:
        if len(self._buf) == self.maxlen:
            self._base += 1
        self._buf.append(event)
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def close(self) -> None:
        self.closed = True
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def stream(self, *, from_start: bool) -> EventStream:
        return EventStream(self, 0 if from_start else self.end)

    async def _wait_beyond(self, cursor: int) -> None:
        while cursor >= self.end and not self.closed:
            if self._wake is None:
                self._wake = anyio.Event()
            await self._wake.wait()


class EventStream:
    """An async iterator over an `EventLog`; ends when the log is closed."""

    __slots__ = ("_cursor", "_log", "dropped")

    def __init__(self, log: EventLog, cursor: int) -> None:
        self._log = log
        self._cursor = cursor
        self.dropped = 0

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        log = self._log
        while True:
            base = log._base
            if self._cursor < base:
                lost = base - self._cursor
                self.dropped += lost
                self._cursor = base
                _log.warning("pipekit.events.dropped", stream=log.name, dropped=lost, history=log.maxlen)
            if self._cursor < log.end:
                event = log._buf[self._cursor - base]
                self._cursor += 1
                return event
            if log.closed:
                raise StopAsyncIteration
            await log._wait_beyond(self._cursor)
